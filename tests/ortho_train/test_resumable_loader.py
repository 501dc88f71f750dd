"""`ResumableLoader`: uninterrupted, `DataLoader(shuffle=True)` to the bit (batches and draws from
the global generator); resumed, the batches and draws of the uninterrupted run."""
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, TensorDataset

from ortho_train.resumable_loader import ResumableLoader
from ortho_train.rng_state import GlobalRNG

PUBLIC = TensorDataset(torch.arange(23))  # 23 items, batches of 4: 5 per pass with drop_last
CANARY = TensorDataset(torch.arange(100, 105))  # 5 items, batches of 2: 2 per pass with drop_last


def _plain(dataset=PUBLIC, batch_size=4, **kwargs):
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, **kwargs)


def _resumable(dataset=PUBLIC, batch_size=4, name="public", **kwargs):
    return ResumableLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, name=name, **kwargs)


def _epochs(loaders: dict, count: int) -> list:
    """Lightning's training iteration over `count` epochs: one `iter()` of the max-size-cycle
    CombinedLoader per epoch, and a draw from the global generator after every batch (a dropout)."""
    combined, seen = CombinedLoader(loaders, "max_size_cycle"), []
    for _ in range(count):
        for batch, _, _ in combined:
            seen.append(({k: v[0].tolist() for k, v in batch.items()}, torch.rand(2).tolist()))
    return seen


@pytest.mark.parametrize("kwargs", [{}, {"drop_last": False}, {"batch_size": 23}, {"shuffle": False}],
                         ids=["drop_last", "last_partial", "one_batch", "not_shuffled"])
def test_uninterrupted_it_is_a_shuffled_dataloader_to_the_bit(kwargs):
    """Three passes of one loader: the same batches and the same global generator state after
    each, with a global draw between batches."""
    kwargs = {"batch_size": 4, "drop_last": True, "shuffle": True} | kwargs

    def passes(make):
        torch.manual_seed(7)
        loader, seen, states = make(), [], []
        for _ in range(3):
            seen.append([(items.tolist(), torch.rand(2).tolist()) for (items,) in loader])
            states.append(torch.get_rng_state())
        return seen, states

    plain, plain_states = passes(lambda: DataLoader(PUBLIC, **kwargs))
    ours, our_states = passes(lambda: ResumableLoader(PUBLIC, name="public", **kwargs))
    assert ours == plain and all(len(batches) >= 1 for batches in plain)
    assert all(torch.equal(a, b) for a, b in zip(plain_states, our_states))
    if kwargs["shuffle"] and kwargs["batch_size"] < len(PUBLIC):
        assert plain[0][0][0] != plain[1][0][0]  # each pass is reshuffled


def test_uninterrupted_two_loaders_cycled_as_lightning_does_draw_as_plain_loaders():
    """Public and canary loaders in a max-size-cycle CombinedLoader over 3 epochs (the canary
    loader restarts within and at every epoch): same batches, same global generator state."""
    torch.manual_seed(3)
    plain = _epochs({"public": _plain(), "canary": _plain(CANARY, 2)}, 3)
    plain_state = torch.get_rng_state()
    torch.manual_seed(3)
    ours = _epochs({"public": _resumable(), "canary": _resumable(CANARY, 2, "canary")}, 3)
    assert ours == plain and len(ours) == 15
    assert torch.equal(torch.get_rng_state(), plain_state)
    assert len({tuple(batch["canary"]) for batch, _ in ours}) > 2  # the canary passes are reshuffled


def _run_to(loader, stop: int) -> list:
    """Batches (and a global draw after each) until `stop` batches were handed out over passes."""
    seen = []
    while len(seen) < stop:
        for (items,) in loader:
            seen.append((items.tolist(), torch.rand(2).tolist()))
            if len(seen) == stop:
                break
    return seen


@pytest.mark.parametrize("stop", [7, 10], ids=["mid_pass", "end_of_pass"])
def test_a_loaded_state_and_generator_continue_as_the_uninterrupted_loader(stop):
    """Saved after `stop` batches (with the global generator state, as the modules save it); a
    fresh loader, iterated before the generator is restored (as Lightning does), continues."""
    torch.manual_seed(5)
    reference = _run_to(_resumable(), 20)
    torch.manual_seed(5)
    saved = _resumable()
    _run_to(saved, stop)
    state, generator = saved.state_dict(), torch.get_rng_state()
    assert state["pass"] == 1 and state["batches"] == stop - 5 and state["seed"] is not None

    torch.manual_seed(1234)  # the resumed process's own set-up draws
    resumed = _resumable()
    resumed.load_state_dict(state)
    batches = iter(resumed)  # Lightning: iter() when the loop sets up its data...
    torch.set_rng_state(generator)  # ...then on_train_start restores the generator
    continued = [(items.tolist(), torch.rand(2).tolist()) for (items,) in batches]
    continued += _run_to(resumed, 20 - stop - len(continued))
    assert continued == reference[stop:]


def test_a_state_of_another_loader_or_version_is_refused():
    other = ResumableLoader(PUBLIC, batch_size=2, name="public")
    with pytest.raises(ValueError, match="resume with the data settings"):
        _resumable().load_state_dict(other.state_dict())
    old = _resumable().state_dict()
    del old["epoch"]
    with pytest.raises(ValueError, match="earlier version"):
        _resumable().load_state_dict(old)


def test_under_ddp_lightning_gives_it_the_distributed_sampler_of_a_plain_loader():
    """Lightning's DDP set-up replaces a plain shuffled loader's sampler with a DistributedSampler
    over the dataset; a ResumableLoader gets the same sampler (not one wrapped around its own
    order), so every rank sees the plain loader's batches."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    with _replace_dunder_methods(DataLoader, "dataset"):  # as Lightning builds the training loaders
        loaders = {"plain": _plain(), "ours": _resumable()}
    for rank in (0, 1):
        seen = {}
        for kind, loader in loaders.items():
            sampler = _get_distributed_sampler(loader, shuffle=True, overfit_batches=0, num_replicas=2, rank=rank,
                                               seed=4)
            assert type(sampler) is DistributedSampler
            rebuilt = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
            torch.manual_seed(0)
            seen[kind] = [[(items.tolist(), torch.rand(1).item()) for (items,) in rebuilt] for _ in range(2)]
        assert seen["ours"] == seen["plain"], rank
        assert type(rebuilt) is ResumableLoader


# ------------------------------------------------------------------------- in Lightning
STEPS = 13  # 5 public batches per epoch: epochs end at steps 5 and 10; canary passes of 2


class _Probe(L.LightningModule):
    """Records every step's batch and a global draw (its 'dropout'), which also moves the weight;
    saves and restores the global generators as the training modules do."""

    def __init__(self, plain: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.plain = plain
        self.global_rng = GlobalRNG()
        self.seen: list = []

    def train_dataloader(self):
        if self.plain:
            return {"public": _plain(), "canary": _plain(CANARY, 2)}
        return {"public": _resumable(), "canary": _resumable(CANARY, 2, "canary")}

    def training_step(self, batch, batch_idx):
        noise = torch.rand(())
        self.seen.append((self.global_step, {k: v[0].tolist() for k, v in batch.items()}, float(noise)))
        return (self.weight - noise) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_save_checkpoint(self, checkpoint):
        self.global_rng.save(checkpoint)

    def on_load_checkpoint(self, checkpoint):
        self.global_rng.load(checkpoint)

    def on_train_start(self):
        self.global_rng.apply_pending()

    def on_train_end(self):
        self.final_generator = torch.get_rng_state()


def _fit(root, module, ckpt_path=None, checkpoints=False):
    callbacks = [ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1, filename="{step}")] \
        if checkpoints else []
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=checkpoints, callbacks=callbacks,
                        default_root_dir=root, num_sanity_val_steps=0)
    L.seed_everything(11, verbose=False)
    trainer.fit(module, ckpt_path=ckpt_path)
    return module


def test_in_lightning_uninterrupted_and_resumed_runs_see_the_plain_loaders_batches(tmp_path):
    """The uninterrupted run equals one with plain shuffled DataLoaders (batches, draws, weight,
    final generator); a run resumed from the checkpoint of any step, mid-pass, at the end of a
    canary pass or at the end of an epoch, continues with the same batches and draws."""
    plain = _fit(tmp_path / "plain", _Probe(plain=True))
    ours = _fit(tmp_path / "ours", _Probe(), checkpoints=True)
    assert ours.seen == plain.seen and len(ours.seen) == STEPS
    assert torch.equal(ours.weight, plain.weight) and torch.equal(ours.final_generator, plain.final_generator)
    for step in range(1, STEPS):
        resumed = _fit(tmp_path / f"resumed_{step}", _Probe(), ckpt_path=tmp_path / "ours" / f"step={step}.ckpt")
        assert resumed.seen == ours.seen[step:], f"resumed after step {step}"
        assert torch.equal(resumed.weight, ours.weight), step
        assert torch.equal(resumed.final_generator, ours.final_generator), step

"""Checkpoints: written atomically in their own directory (a full disk leaves the old one and no
temporary), and a file that is no whole checkpoint is refused with a message naming it, its size
and the checkpoints beside it, never suggesting `weights_only=False`."""
import lightning as L
import pytest
import torch

from ortho_train import artifacts
from ortho_train.artifacts import DiskSpaceError
from ortho_train.checkpoint_io import AtomicCheckpointIO, UnreadableCheckpointError, use_atomic_checkpoints


def _checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((4096,), value)}, "global_step": 3}


def _hidden(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_a_saved_checkpoint_loads_back(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(1.5), tmp_path / "step=3.ckpt")
    loaded = io.load_checkpoint(tmp_path / "step=3.ckpt")
    assert torch.equal(loaded["state_dict"]["w"], torch.full((4096,), 1.5)) and loaded["global_step"] == 3
    assert _hidden(tmp_path) == []


def test_a_checkpoint_without_room_keeps_the_old_one_and_names_directory_and_bytes(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(_checkpoint(1.0), path)
    monkeypatch.setattr(artifacts, "available_bytes", lambda directory: 1000)
    with pytest.raises(DiskSpaceError) as refused:
        io.save_checkpoint(_checkpoint(2.0), path)
    assert str(tmp_path.resolve()) in str(refused.value) and "last.ckpt" in str(refused.value)
    assert "bytes" in str(refused.value)
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.full((4096,), 1.0))  # the old one, whole
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncated", "text", "foreign pickle"])
def test_an_unreadable_checkpoint_is_refused_by_name_without_suggesting_weights_only_false(tmp_path, damage):
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(1.0), tmp_path / "step=2.ckpt")
    bad = tmp_path / "step=4.ckpt"
    if damage == "truncated":
        bad.write_bytes((tmp_path / "step=2.ckpt").read_bytes()[:5000])
    elif damage == "text":
        bad.write_text("not a checkpoint\n")
    else:
        torch.save({"state_dict": {}, "thing": L.Callback()}, bad)  # a class the weights-only loader refuses
    with pytest.raises(UnreadableCheckpointError) as refused:
        io.load_checkpoint(bad, weights_only=True)
    message = str(refused.value)
    assert str(bad) in message and f"{bad.stat().st_size:,} bytes" in message and "step=2.ckpt" in message
    assert "weights_only" not in message and refused.value.__suppress_context__


def test_a_file_that_loads_but_is_no_lightning_checkpoint_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.ckpt")
    with pytest.raises(UnreadableCheckpointError, match="no state_dict"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "weights.ckpt")


def test_the_trainer_gets_the_atomic_io_unless_a_plugin_was_chosen():
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    use_atomic_checkpoints(trainer)
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO

    class OwnIO(AtomicCheckpointIO):
        pass

    trainer = L.Trainer(logger=False, enable_progress_bar=False, plugins=[OwnIO()])
    use_atomic_checkpoints(trainer)
    assert type(trainer.strategy.checkpoint_io) is OwnIO

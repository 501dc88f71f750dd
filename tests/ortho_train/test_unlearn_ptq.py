"""Quantisation bin widths, bin crossing and the bitsandbytes PTQ copies (NF4/FP4, LoRA deployments)."""
import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from ortho_kernels.bitsandbytes_offline import import_bitsandbytes
from ortho_train import quantisation as quant
from ortho_train.model_support import merged_copy
from ortho_train.models import load_causal_lm
from ortho_train.quantisation import bins, bnb4, bnb4_exact
from ortho_train.quantisation.int_rtn import group_bin_width
from tests.ortho_train.unlearn_helpers import cached_tiny_canary_model, single_thread  # noqa: F401

bnb_functional = import_bitsandbytes().functional

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]


def test_nf4_code_is_the_fixed_bitsandbytes_code():
    torch.testing.assert_close(bnb4.code_levels("nf4"), torch.tensor(NF4))
    assert len(bnb4.code_levels("fp4")) == 15  # ±0 coincide


def test_level_widths_golden():
    mids, widths = bins.level_widths(torch.tensor([-1.0, 0.0, 0.5, 1.0]))
    assert mids.tolist() == [-0.5, 0.25, 0.75]
    assert widths.tolist() == [1.0, 0.75, 0.5, 0.5]  # edges: spacing to the one neighbour


def test_blockwise_bin_width_uses_block_absmax_and_local_level():
    w = torch.zeros(2, 64)
    w[0, 0], w[0, 1], w[0, 2] = 2.0, 0.0, -2.0 * 0.5250730514526367  # block 0: absmax 2
    w[1, 0] = 0.5  # block 1: absmax 0.5, the other weights at level 0
    width = bnb4.blockwise_bin_width(w, "nf4", 64)
    code = torch.tensor(NF4)
    assert width[0, 0].item() == pytest.approx(2 * (code[15] - code[14]).item())
    assert width[0, 1].item() == pytest.approx(2 * (code[8] - code[6]).item() / 2)
    assert width[0, 2].item() == pytest.approx(2 * (code[3] - code[1]).item() / 2)
    assert width[1, 5].item() == pytest.approx(0.5 * (code[8] - code[6]).item() / 2)


def test_nearest_level_agrees_with_bitsandbytes_rounding():
    w = torch.randn(64, 128)
    mids, _ = bins.level_widths(bnb4.code_levels("nf4"))
    blocks = w.reshape(-1, 64)  # (n_blocks, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    ours = bnb4.code_levels("nf4")[torch.bucketize((blocks / absmax).contiguous(), mids)] * absmax
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    theirs = bnb_functional.dequantize_4bit(packed, state).reshape(-1, 64)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_group_bin_width_int4_golden_with_ragged_group():
    w = torch.tensor([[0.0, 1.5, 3.0, 0.0, 15.0], [1.0, 2.5, -3.0, -1.5, 0.0]])  # groups of 2, last ragged
    expected = torch.tensor([[0.1, 0.1, 0.2, 0.2, 1.0], [2.5 / 15, 2.5 / 15, 0.2, 0.2, 0.0]])  # range holds 0
    torch.testing.assert_close(group_bin_width(w, group_size=2), expected)


def test_bin_crossing_and_dequantised_change_counts():
    w0 = torch.tensor([0.0, 0.0, 0.0, 1.0])
    w1 = torch.tensor([0.0, 0.2, 0.6, 1.0])
    width = torch.ones(4)
    assert bins.bin_crossing_counts(w0, w1, width) == (1, 2)  # only |Δ| = 0.6 > 0.5 crosses; 2 updated
    q0, q1 = torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert bins.dequantised_change_counts(q0, q1, w0, w1) == (1, 2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return cached_tiny_canary_model(tmp_path_factory)


def _ids():
    return torch.randint(3, 259, (2, 17), generator=torch.Generator().manual_seed(0))


def _portable(model):
    """`model` with bitsandbytes' generic CPU path in every Linear4bit, as our copies use by default (on an
    AVX512-BF16 CPU transformers' loading would otherwise repack for the bf16 kernel at the first call)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _exact_nf4_model(model, settings):
    """`model` with every quantised linear's weight replaced by its exact fake-quantised NF4 weight."""
    dense = copy.deepcopy(model)
    quant.quantise_linears_(dense, "nf4", settings, deployed_modules=False)
    return dense.eval()


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_copy_equals_transformers_bitsandbytes_loading(model_dir, double_quant):
    settings = quant.PTQConfig(double_quant=double_quant)
    model = load_causal_lm(model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ours = quant.quantised_copy(model, "nf4", settings)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=torch.float32)
    theirs = _portable(AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config,
                                                            device_map="cpu", dtype=torch.float32))
    with torch.no_grad():
        # the format's definition on every host: dequantise-then-matmul in fp32 (float noise only)
        exact = _exact_nf4_model(model, settings)(_ids()).logits
        torch.testing.assert_close(ours(_ids()).logits, exact, atol=1e-5, rtol=1e-5)
        # an independent implementation: transformers' loading (every input width here, 64 and 128, is a
        # multiple of the blocksize, where bitsandbytes' generic path is right on every host; other
        # widths: test_deployed_layer_of_any_width_computes_the_4bit_weight)
        torch.testing.assert_close(ours(_ids()).logits, theirs(_ids()).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours(_ids()).logits, model(_ids()).logits, atol=1e-4)  # it did quantise
    assert type(ours.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert type(ours.lm_head) is torch.nn.Linear  # skipped, as transformers does
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"quantised_copy modified the original ({key})"


def test_lora_deployments_merged_and_adapter(model_dir, tmp_path):
    settings = quant.PTQConfig()
    model = get_peft_model(load_causal_lm(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # a non-trivial adapter
    model.save_pretrained(tmp_path / "adapter")
    ids = _ids()
    with torch.no_grad():
        adapter = quant.quantised_copy(model, "nf4", settings, "adapter")(ids).logits
        merged = quant.quantised_copy(model, "nf4", settings, "merged")(ids).logits
        # "NF4 base + fp adapter" is what plain peft on a bitsandbytes-loaded base computes
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        base = _portable(AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config,
                                                              device_map="cpu", dtype=torch.float32))
        reference = PeftModel.from_pretrained(base, tmp_path / "adapter")(ids).logits
        torch.testing.assert_close(adapter, reference, atol=1e-5, rtol=1e-5)
        # the same deployment by definition: exact NF4 base weights + the fp32 adapter
        exact_base = copy.deepcopy(model)
        quant.quantise_linears_(exact_base, "nf4", settings, deployed_modules=False)
        torch.testing.assert_close(adapter, exact_base.eval()(ids).logits, atol=1e-5, rtol=1e-5)
        # "merge then quantise" quantises the merged weights: a different model. Same merge, same
        # quantiser and the same (eval-mode) kernel on both sides: only float noise may differ.
        plain = quant.quantise_linears_(merged_copy(model), "nf4", settings).eval()(ids).logits
        torch.testing.assert_close(merged, plain, atol=1e-5, rtol=1e-5)
        assert (merged - adapter).abs().max() > 1e-4


def test_effective_weights_of_lora_are_merged(model_dir):
    model = get_peft_model(load_causal_lm(model_dir), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(0.5)
    weights = quant.effective_linear_weights(model)
    expected = layer.base_layer.weight + 0.5 * layer.lora_A["default"].weight.sum(0, keepdim=True).expand(64, -1)
    torch.testing.assert_close(weights["model.layers.0.self_attn.q_proj"], expected)
    assert "lm_head" not in weights and not any("lora" in name for name in weights)


def test_unknown_format_and_bad_blocksize_are_clear():
    with pytest.raises(ValueError, match="unknown quantisation format 'int3'"):
        quant.fake_quantise(torch.zeros(4, 4), "int3", quant.PTQConfig())
    with pytest.raises(ValueError, match="blocksize"):
        quant.PTQConfig(blocksize=48)


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """Make bitsandbytes believe the CPU has AVX512-BF16, as on AMD Zen 4 / Intel Sapphire Rapids:
    its `Linear4bit` then repacks the weight for its fused bf16 kernel on the first eval call."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def _width_48_model():
    """Widths the AVX512-BF16 repacking cannot tile: 48 output rows (not a multiple of 32). Every
    input width is a multiple of the blocksize (64), so bitsandbytes' generic path is right on any host."""
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 48))
    torch.nn.init.normal_(model[0].weight, std=0.05)
    return model.eval()


def test_portable_kernel_is_chosen_on_an_avx512bf16_cpu(avx512bf16_cpu):
    """The default copy never takes the repacked path, so a width the repacking cannot tile (48)
    works and the numbers are those of the generic path on any CPU."""
    model, x = _width_48_model(), torch.randn(3, 128)
    copy_ = quant.quantise_linears_(copy.deepcopy(model), "nf4", quant.PTQConfig(skip_modules=[])).eval()
    assert not any(layer.support_avx512bf16_for_cpu for layer in copy_ if hasattr(layer, "weight"))
    with torch.no_grad():
        out = copy_(x)
    dense = copy.deepcopy(model)
    for layer in dense:
        if isinstance(layer, torch.nn.Linear):
            layer.weight.data = quant.fake_quantise(layer.weight, "nf4", quant.PTQConfig())
    with torch.no_grad():
        # generic bitsandbytes path = dequantise + fp32 matmul: float noise only (K ≤ 128)
        torch.testing.assert_close(out, dense(x), atol=1e-5, rtol=1e-5)
    assert not getattr(copy_[0].weight.quant_state, "packing_format_for_cpu", False)


def _unquantised_linear4bit(rows: int, cols: int):
    bnb = import_bitsandbytes()

    return bnb.nn.Linear4bit(cols, rows, bias=False, quant_type="nf4", compute_dtype=torch.float32)


def test_native_kernel_skips_layers_it_cannot_repack(avx512bf16_cpu, caplog):
    """The repacking tiles 32 output rows and whole blocks of inputs per row; other layers stay portable."""
    settings = quant.PTQConfig(skip_modules=[], cpu_kernel="native")
    with caplog.at_level("INFO", logger=bnb4.__name__):
        assert bnb4.use_native_cpu_kernel(_unquantised_linear4bit(64, 128), settings) is True
        assert bnb4.use_native_cpu_kernel(_unquantised_linear4bit(48, 128), settings) is False  # 48 rows
        assert bnb4.use_native_cpu_kernel(_unquantised_linear4bit(64, 96), settings) is False  # 96 = 1.5 blocks
    assert "48x128 layer" in caplog.text and "64x96 layer" in caplog.text and "portable" in caplog.text
    assert bnb4.use_native_cpu_kernel(_unquantised_linear4bit(64, 128), quant.PTQConfig()) is False  # portable


@pytest.mark.skipif(not bnb_functional.has_avx512bf16(), reason="needs a CPU with AVX512-BF16 (bitsandbytes' repacked kernel)")
def test_native_kernel_runs_on_an_avx512bf16_cpu():
    """On a CPU that has the kernel: the repacked layers compute in bf16, within 4 bf16 ulps of the exact weight."""
    model, x = _width_48_model(), torch.randn(3, 128)
    copy_ = quant.quantise_linears_(copy.deepcopy(model), "nf4", quant.PTQConfig(skip_modules=[], cpu_kernel="native"))
    assert copy_[0].support_avx512bf16_for_cpu is True and copy_[2].support_avx512bf16_for_cpu is False
    assert getattr(copy_[0].weight.quant_state, "packing_format_for_cpu", False)  # repacked by the check's eval call
    exact = _exact_nf4_model(model, quant.PTQConfig(skip_modules=[]))
    with torch.no_grad():
        error = (copy_.eval()(x) - exact(x)).norm() / exact(x).norm()
    assert 0 < error < 4 * torch.finfo(torch.bfloat16).eps


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("cols", [96, 128, 688])
def test_exact_dequantisation_is_the_format_on_every_host(quant_type, double_quant, cols):
    """code[q]·absmax of the row-major block, also where a block spans two rows (K = 96, 688 with blocks
    of 64): the nearest code level of each weight in its flat block, computed here independently."""
    w = torch.randn(24, cols, generator=torch.Generator().manual_seed(cols))
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                                 compress_statistics=double_quant)
    ours = bnb4_exact.exact_dequantise_4bit(packed, state)
    blocks = w.reshape(-1, 64)  # (n_blocks, 64): 24·cols is a multiple of 64 for these widths
    absmax = bnb4_exact.block_absmax(state).view(-1, 1)  # (n_blocks, 1), the (double-)quantised absmax
    levels = bnb4.code_levels(quant_type)
    normalised = blocks / blocks.abs().amax(1, keepdim=True)  # (n_blocks, 64) w / true absmax
    nearest = levels[(normalised.unsqueeze(-1) - levels).abs().argmin(-1)]  # (n_blocks, 64)
    # bitsandbytes divides in its own float order: a weight within 1e-5 of a midpoint between two
    # levels may round either way, so those (a few per million) are left out; every other weight is
    # one fp32 product code · absmax on both sides
    mids, _ = bins.level_widths(levels)
    clear = (normalised.unsqueeze(-1) - mids).abs().amin(-1) > 1e-5  # (n_blocks, 64)
    assert clear.float().mean() > 0.999
    torch.testing.assert_close(ours.reshape(-1, 64)[clear], (nearest * absmax)[clear], atol=0, rtol=0)


def test_deployed_layer_of_any_width_computes_the_4bit_weight():
    """On every host a deployed NF4 layer with K = 96 (blocks span rows) computes x ŵᵀ + b: bitsandbytes'
    Linear4bit where this host's kernel is right, the exact fallback where it is not."""
    linear = torch.nn.Linear(96, 64)
    copy_ = quant.quantise_linears_(torch.nn.Sequential(copy.deepcopy(linear)), "nf4",
                                    quant.PTQConfig(skip_modules=[])).eval()
    w_hat = quant.fake_quantise(linear.weight, "nf4", quant.PTQConfig())
    x = torch.randn(5, 96)
    with torch.no_grad():
        torch.testing.assert_close(copy_(x), x @ w_hat.T + linear.bias, atol=1e-5, rtol=1e-5)


def test_a_host_kernel_that_computes_wrongly_is_replaced_and_logged(monkeypatch, caplog):
    """A Linear4bit whose forward is off (as bitsandbytes 0.50's CPU kernel is on AVX-512 hosts for K not a
    multiple of the blocksize; here forced on any host by scaling its output by 1.1) becomes a dense linear
    holding the exact 4-bit weight, and the log says why, once per shape."""
    bnb = import_bitsandbytes()

    real = bnb.matmul_4bit
    monkeypatch.setattr(bnb, "matmul_4bit", lambda *args, **kwargs: 1.1 * real(*args, **kwargs))
    bnb4._REPORTED_FALLBACKS.clear()
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    with caplog.at_level("WARNING", logger=bnb4.__name__):
        copy_ = quant.quantise_linears_(copy.deepcopy(model), "fp4", quant.PTQConfig(skip_modules=[])).eval()
    assert all(type(layer) is torch.nn.Linear and layer.exact_fake_quantised == "fp4" for layer in copy_)
    assert quant.exact_fallback_layers(copy_) == ["0", "1", "2"]  # what ptq_gap.json lists per variant
    assert caplog.text.count("exact fake quantisation") == 2  # 64x128 once, 64x64 once (two layers)
    assert "64x128" in caplog.text and "relative error of 0.1" in caplog.text
    assert "cause: this host's bitsandbytes kernel" in caplog.text  # widths are whole blocks: not the width bug
    x = torch.randn(3, 128)
    expected = x
    for layer in model:
        expected = expected @ quant.fake_quantise(layer.weight, "fp4", quant.PTQConfig()).T + layer.bias
    with torch.no_grad():
        torch.testing.assert_close(copy_(x), expected, atol=1e-5, rtol=1e-5)


def test_forward_tolerance_follows_the_multiplying_dtype():
    settings = quant.PTQConfig()
    layer = _unquantised_linear4bit(64, 128)
    layer.support_avx512bf16_for_cpu = False
    assert bnb4.forward_tolerance(layer, settings) == 1e-4  # fp32: summation order only
    layer.support_avx512bf16_for_cpu = True
    assert bnb4.forward_tolerance(layer, settings) == 4 * torch.finfo(torch.bfloat16).eps  # the repacked kernel


def test_ptq_config_rejects_an_unknown_cpu_kernel():
    with pytest.raises(ValueError, match="cpu_kernel"):
        quant.PTQConfig(cpu_kernel="fast")

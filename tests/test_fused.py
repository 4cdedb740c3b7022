"""The compiled row kernels of CPU decoding (models/fused.py, models/kernels/rowops.c): each kernel
against torch's own op, the checks that keep a wrong pointer from the C code, the build cache and
its fallbacks, and the int8 model with and without them."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from aigc_cli.models import fused

needs_compiler = pytest.mark.skipif(fused._compiler() is None, reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def ops() -> fused.RowOps:
    found = fused.row_ops()
    assert found is not None, "a C compiler is here, so the kernels must build and pass their check"
    return found


@needs_compiler
@pytest.mark.parametrize("rows,dim", [(1, 768), (5, 768), (3, 50), (2, 1600)])
def test_layer_norm_with_and_without_a_residual_matches_torch(ops, rows, dim):
    g = torch.Generator().manual_seed(rows * dim)
    x, res = torch.randn(rows, dim, generator=g) * 30 + 5, torch.randn(rows, dim, generator=g)
    w, b = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    assert torch.allclose(ops.layer_norm(x.clone(), w, b, 1e-5), F.layer_norm(x, (dim,), w, b, 1e-5), atol=2e-5)
    summed = x.clone()
    got = ops.layer_norm(summed, w, b, 1e-5, residual=res)
    assert torch.equal(summed, x + res)  # the residual add is torch's add, to the bit
    assert torch.allclose(got, F.layer_norm(x + res, (dim,), w, b, 1e-5), atol=2e-5)


@needs_compiler
def test_a_streams_norms_add_into_x_and_rewrite_one_buffer_with_the_bound_norms_bits(ops):
    """The level step's residual stream: each norm adds a sublayer's output into x (torch's add, to
    the bit) and rewrites the one buffer h with what `Norm` gives (the batch step's call)."""
    g = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(3, 768, generator=g) * 30 + 5, torch.randn(768, generator=g), torch.randn(768, generator=g)
    original, norm = x.clone(), ops.norm(w, b, 1e-5)
    stream = ops.stream(x)
    h = stream.norm(norm)
    assert torch.equal(x, original) and torch.equal(h, norm(original.clone()))
    assert torch.allclose(h, F.layer_norm(original, (768,), w, b, 1e-5), atol=2e-5)
    for _ in range(2):
        res, before = torch.randn(3, 768, generator=g), x.clone()
        again = stream.norm(norm, res)
        assert again is h  # one buffer for the whole step
        assert torch.equal(x, before + res) and torch.equal(h, norm(before.clone(), res))


@needs_compiler
def test_a_stream_refuses_what_its_kernel_cannot_read(ops):
    w = torch.randn(768)
    norm = ops.norm(w, w, 1e-5)
    for bad in (torch.randn(768), torch.randn(768, 2).t(), torch.randn(2, 768).double()):
        with pytest.raises(ValueError, match="stream"):
            ops.stream(bad)
    stream = ops.stream(torch.randn(2, 768))
    for bad in (torch.randn(1, 768), torch.randn(2, 768).double(), torch.randn(768).expand(2, 768), torch.randn(768, 2).t()):
        with pytest.raises(ValueError, match="residual"):
            stream.norm(norm, bad)
    with pytest.raises(ValueError, match="width 50"):
        stream.norm(ops.norm(torch.randn(50), torch.randn(50), 1e-5))


@needs_compiler
def test_gelu_matches_torch_over_its_range_and_keeps_nan_and_inf(ops):
    x = torch.cat([torch.linspace(-12, 12, 4001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, 80.0, -80.0])])
    got = ops.gelu_(x.clone().view(1, -1)).view(-1)
    want = F.gelu(x, approximate="tanh")
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)
    special = ops.gelu_(torch.tensor([[math.nan, math.inf]]))
    assert math.isnan(special[0, 0]) and special[0, 1] == math.inf


def _naive_attention(q, keys, values, p, scale):
    """softmax(q K * scale) V over positions 0..p for one row: q (H, D), keys and values (H, C, D)."""
    scores = torch.einsum("hd,hsd->hs", q.double(), keys[:, : p + 1].double()) * scale
    return torch.einsum("hs,hsd->hd", torch.softmax(scores, -1), values[:, : p + 1].double())


def _cache(layout, layers, slots, heads, cap, dim, g):
    """A (layers, slots, heads, cap, dim) view of random values stored as the layout says: by
    position (SlotCache(layout="positions"), keys and values) or by head (how a "heads" SlotCache
    stores its values)."""
    if layout == "positions":
        return torch.randn(layers, slots, cap, heads, dim, generator=g).transpose(2, 3)
    return torch.randn(layers, slots, heads, cap, dim, generator=g)


@needs_compiler
@pytest.mark.parametrize("layout", ["positions", "heads"])
@pytest.mark.parametrize("positions", [[0], [5, 0, 17], [1023, 400]], ids=["one position", "rows apart", "full context"])
def test_attention_matches_a_naive_computation_and_writes_only_its_rows_positions(ops, positions, layout):
    """Rows at slots 1.. of a 3-layer cache, each at its own position: the attention equals a
    float64 computation, each row's key and value land at its position of layer 1, and nothing
    else in the cache moves; for caches stored by position (the model's) and by head (other strides)."""
    g = torch.Generator().manual_seed(len(positions))
    layers, heads, dim, cap, rows, first = 3, 12, 64, 1024, len(positions), 1
    keys, values = (_cache(layout, layers, rows + 2, heads, cap, dim, g) for _ in range(2))
    before_k, before_v = keys.clone(), values.clone()
    qkv = torch.randn(rows, 3 * heads * dim, generator=g) * 3
    out = ops.attention(keys, values, first, positions, dim**-0.5)(1, qkv)
    q, k, v = qkv.view(rows, 3, heads, dim).unbind(1)
    for r, p in enumerate(positions):
        slot = first + r
        assert torch.equal(keys[1, slot, :, p], k[r]) and torch.equal(values[1, slot, :, p], v[r])
        before_k[1, slot, :, p], before_v[1, slot, :, p] = k[r], v[r]
        want = _naive_attention(q[r], keys[1, slot], values[1, slot], p, dim**-0.5)
        assert torch.allclose(out[r].view(heads, dim).double(), want, atol=1e-5)
    assert torch.equal(keys, before_k) and torch.equal(values, before_v)


@needs_compiler
def test_int8_embedding_matches_torch_and_refuses_ids_outside_the_table(ops):
    g = torch.Generator().manual_seed(1)
    table, scale, pe = torch.randint(-127, 128, (300, 768), generator=g, dtype=torch.int8), torch.rand(300, generator=g), torch.randn(1024, 768, generator=g)
    ids, pos = torch.tensor([299, 0, 17, 17]), torch.tensor([1023, 0, 5, 6])
    assert torch.allclose(ops.embed_int8(table, scale, pe, ids, pos), table[ids].float() * scale[ids, None] + pe[pos], atol=1e-6)
    for bad_ids, bad_pos in (([300], [0]), ([-1], [0]), ([5], [1024])):
        with pytest.raises(ValueError, match="outside"):
            ops.embed_int8(table, scale, pe, torch.tensor(bad_ids), torch.tensor(bad_pos))
    with pytest.raises(ValueError, match="embed_int8"):
        ops.embed_int8(table.float(), scale, pe, ids, pos)
    bound = ops.embedding(table, scale, pe)  # the model's, bound at load: each call checks ids and positions
    assert torch.equal(bound(ids, pos), ops.embed_int8(table, scale, pe, ids, pos))
    for bad_ids, bad_pos in ((ids.int(), pos), (ids, pos[:3]), (ids.view(2, 2), pos.view(2, 2)), (ids[::2], pos[::2].clone())):
        with pytest.raises(ValueError, match="ids and pos"):
            bound(bad_ids, bad_pos)


@needs_compiler
def test_wrong_shapes_are_refused_before_any_pointer_reaches_the_c_code(ops):
    x, w = torch.randn(2, 768), torch.randn(768)
    keys, values = torch.zeros(2, 3, 12, 16, 64), torch.zeros(2, 3, 12, 16, 64)
    with pytest.raises(ValueError, match="layer_norm"):
        ops.layer_norm(x, w[:700], w, 1e-5)
    with pytest.raises(ValueError, match="layer_norm"):
        ops.layer_norm(x.t(), w, w, 1e-5)
    with pytest.raises(ValueError, match="residual"):
        ops.layer_norm(x, w, w, 1e-5, residual=torch.randn(1, 768))
    with pytest.raises(ValueError, match="gelu"):
        ops.gelu_(x.double())
    with pytest.raises(ValueError, match="outside the cache"):
        ops.attention(keys, values, 2, [3, 3], 0.1)  # slots 2..3 of 3
    with pytest.raises(ValueError, match="outside the cache"):
        ops.attention(keys, values, 0, [16], 0.1)  # position 16 of 16
    with pytest.raises(ValueError, match="one shape"):
        ops.attention(keys, values[..., :32], 0, [3], 0.1)
    with pytest.raises(ValueError, match="head_dim contiguous"):  # keys stored transposed (a "heads" SlotCache)
        ops.attention(torch.zeros(2, 3, 12, 64, 16).transpose(3, 4), values, 0, [3], 0.1)
    attention = ops.attention(keys, values, 0, [3], 0.1)
    with pytest.raises(ValueError, match="qkv"):
        attention(0, torch.randn(2, 3 * 768))  # two rows for a one-row step
    with pytest.raises(ValueError, match="qkv"):
        attention(2, torch.randn(1, 3 * 768))  # a layer the cache does not have
    two = ops.attention(keys, values, 0, [3, 5], 0.1)
    for bad in (torch.randn(3 * 768, 2).t(), torch.randn(2, 3 * 768).double(), torch.randn(3 * 768).expand(2, 3 * 768)):
        with pytest.raises(ValueError, match="qkv"):
            two(0, bad)


def _fresh(monkeypatch, tmp_path, **env):
    """row_ops() as a new process would see it: its cache cleared, aigc's cache dir at tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fused.row_ops.cache_clear()
    return fused.row_ops()


@pytest.fixture
def restore_row_ops():
    yield
    fused.row_ops.cache_clear()


@needs_compiler
def test_the_library_is_built_once_and_then_read_from_the_cache(monkeypatch, tmp_path, restore_row_ops):
    assert _fresh(monkeypatch, tmp_path) is not None
    built = list((tmp_path / "aigc" / "kernels").glob("rowops-*.so"))
    assert len(built) == 1 and not list((tmp_path / "aigc" / "kernels").glob("*.tmp*"))

    def no_compiler(*args, **kwargs):
        raise AssertionError("built again")

    monkeypatch.setattr(fused.subprocess, "run", no_compiler)
    assert _fresh(monkeypatch, tmp_path) is not None


@needs_compiler
def test_a_damaged_cached_library_is_built_again(tmp_path):
    """In fresh processes (a process keeps the library it loaded): one builds it, the file is then
    replaced by garbage, and the next process builds it again instead of failing."""
    probe = "from aigc_cli.models import fused; print(fused.row_ops() is not None)"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    run = lambda: subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert run().stdout.strip() == "True"
    (built,) = (tmp_path / "aigc" / "kernels").glob("rowops-*.so")
    damaged = built.with_suffix(".new")
    damaged.write_bytes(b"not a library")
    os.replace(damaged, built)
    again = run()
    assert again.stdout.strip() == "True", again.stderr
    assert built.read_bytes()[:4] == b"\x7fELF"


@needs_compiler
def test_a_cache_that_cannot_be_written_only_costs_the_build(monkeypatch, tmp_path, restore_row_ops):
    """aigc's cache dir lies under a plain file (no directory can be made there): the library is
    built and loaded from a temporary directory instead, which is gone afterwards."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    made = []
    real = fused.tempfile.TemporaryDirectory

    def remembered(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(fused.tempfile, "TemporaryDirectory", remembered)
    assert _fresh(monkeypatch, blocker) is not None
    assert made and not os.path.exists(made[0].name)


def test_without_a_working_compiler_or_when_turned_off_there_are_no_kernels(monkeypatch, tmp_path, restore_row_ops):
    assert _fresh(monkeypatch, tmp_path, AIGC_FUSED="0") is None
    monkeypatch.delenv("AIGC_FUSED")
    failing = shutil.which("false")
    assert failing is not None
    assert _fresh(monkeypatch, tmp_path / "broken", CC=failing) is None  # the compiler fails
    monkeypatch.setattr(fused, "_compiler", lambda: None)
    assert _fresh(monkeypatch, tmp_path / "none") is None  # no compiler at all


@pytest.mark.parametrize("quantize", ["none", "int8"], ids=["float32", "int8"])
def test_a_model_without_the_kernels_runs_torchs_ops_and_agrees_with_them(tiny_lm, monkeypatch, restore_row_ops, quantize):
    """With the kernels turned off a CPU model (exact or int8) steps with torch's ops; with them
    (where they build) it gives the same tokens on the tiny model and logits within 1e-3 (measured
    ~1e-7), in the batch step (rows at different positions) and in the level step (rows at one
    position)."""
    from aigc_cli.models.gpt2 import from_hf_model

    monkeypatch.setenv("AIGC_FUSED", "0")
    fused.row_ops.cache_clear()
    plain = from_hf_model(tiny_lm.hf_model, quantize=quantize)
    assert plain.rowops is None
    monkeypatch.delenv("AIGC_FUSED")
    fused.row_ops.cache_clear()
    model = from_hf_model(tiny_lm.hf_model, quantize=quantize)
    if fused._compiler() is None:
        assert model.rowops is None
        return
    assert model.rowops is not None
    prompt = tiny_lm.tokenizer.encode("the cat sat on the mat and", add_special_tokens=False)
    for prompts in ([prompt, prompt[:3]], [prompt, prompt]):  # the batch step (rows apart), the level step
        runs = []
        for m in (plain, model):
            slots = m.new_slots()
            slots.reserve(2, 64)
            logits = m.step(None, slots, prompts)
            tokens, steps = logits.argmax(-1) + torch.tensor([0, 1]), [logits]
            for _ in range(10):
                logits = m.step(tokens, slots, [])
                tokens = logits.argmax(-1)
                steps.append(logits)
            runs.append(torch.stack(steps))
        worst = ((runs[0] - runs[1]).abs().max() / runs[0].abs().max()).item()
        assert worst < (1e-3 if quantize == "int8" else 1e-5), worst  # int8: no activation crossed a rounding boundary here
        assert torch.equal(runs[0].argmax(-1), runs[1].argmax(-1))


def _slot_ops(slots, g):
    """The same cache work on any layout: two rows prefilled, a third forked, steps written, a row
    removed, the cache grown, rows swapped by `tidy`; every write of random values from `g`."""
    cfg = slots.cfg
    slots.reserve(3, 8)
    for row, n in ((0, 5), (1, 2)):
        slots.keys[:, row, :, :n] = torch.randn(cfg.n_layer, cfg.n_head, n, cfg.n_embd // cfg.n_head, generator=g)
        slots.v[:, row, :, :n] = torch.randn(cfg.n_layer, cfg.n_head, n, cfg.n_embd // cfg.n_head, generator=g)
        slots.lengths.append(n)
    slots.fork(1, 1)
    slots.k[:, 2, :, :, 2] = torch.randn(cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, generator=g)
    slots.copy_position(2, [1], 2)
    slots.lengths[1:3] = [3, 3]
    slots.remove(0)
    slots.resize(12, 30)
    for row in range(2, 12):
        slots.keys[:, row, :, :20] = torch.randn(cfg.n_layer, cfg.n_head, 20, cfg.n_embd // cfg.n_head, generator=g)
        slots.v[:, row, :, :20] = torch.randn(cfg.n_layer, cfg.n_head, 20, cfg.n_embd // cfg.n_head, generator=g)
        slots.lengths.append(20)
    return slots.tidy()


def test_a_slot_cache_stored_by_position_behaves_as_one_stored_by_head():
    """Every SlotCache operation gives the same keys and values whichever way the cache is stored
    ("positions" is what the int8 kernels read), and only "positions" keeps head_dim contiguous
    in `keys`; an unknown layout is refused."""
    from aigc_cli.models.gpt2 import Config, SlotCache

    cfg = Config(n_layer=2, n_head=3, n_embd=12, n_positions=64, vocab_size=10, eps=1e-5, tied=True, n_inner=0)
    caches = {layout: SlotCache(cfg, torch.float32, "cpu", layout) for layout in SlotCache.LAYOUTS}
    swaps = {layout: _slot_ops(c, torch.Generator().manual_seed(3)) for layout, c in caches.items()}
    heads, positions = caches["heads"], caches["positions"]
    assert swaps["heads"] == swaps["positions"] != []
    assert heads.lengths == positions.lengths and heads.capacity == positions.capacity == (12, 30)
    assert torch.equal(heads.keys, positions.keys) and torch.equal(heads.v, positions.v) and torch.equal(heads.k, positions.k)
    assert positions.keys.stride(4) == positions.v.stride(4) == 1 and heads.keys.stride(4) != 1
    assert positions.keys.stride(3) == positions.v.stride(3) == cfg.n_embd  # a position's heads together
    with pytest.raises(ValueError, match="layout"):
        SlotCache(cfg, torch.float32, "cpu", "rows")


@needs_compiler
def test_an_int8_step_reuses_its_attention_plan_until_the_cache_is_resized(tiny_lm):
    """The compiled attention's plan is kept between steps of the same rows and made again when the
    rows change or the cache's buffers do (a stale plan would write this step's keys into the old
    buffers, which it keeps alive, and read them back from there): logits after a resize
    mid-generation equal those of a cache that never grew."""
    from aigc_cli.models.gpt2 import from_hf_model

    model = from_hf_model(tiny_lm.hf_model, quantize="int8")
    assert model.rowops is not None
    prompt = tiny_lm.tokenizer.encode("the cat sat on the mat and", add_special_tokens=False)
    runs = []
    for grow in (False, True):
        slots = model.new_slots()
        assert slots.layout == "positions"
        slots.reserve(1, len(prompt) + 5 if grow else 40)
        tokens, steps, plans = model.step(None, slots, [prompt]).argmax(-1), [], []
        for i in range(20):
            if grow and slots.lengths[0] + 1 >= slots.capacity[1]:
                stale = slots.plan
                slots.reserve(1, 40)
                assert slots.plan is None
                slots.plan = stale  # as if some other path changed the buffers: the plan must see it
            logits = model.step(tokens, slots, [])
            plans.append(slots.plan)
            tokens = logits.argmax(-1)
            steps.append(logits)
        runs.append(torch.stack(steps))
        assert len({id(p) for p in plans}) == (2 if grow else 1)
    assert torch.equal(runs[0], runs[1])



@pytest.mark.parametrize("rows", [1, 3])
def test_the_torch_step_on_a_cache_stored_by_position_equals_it_on_one_stored_by_head(tiny_lm, rows, monkeypatch):
    """A float32 model on torch's ops (no kernels) given a "positions" cache: rows at one position
    step through `_step` (the level step's lane views need keys stored by head), with the same logits."""
    from aigc_cli.models.gpt2 import SlotCache, from_hf_model

    monkeypatch.setattr(fused, "row_ops", lambda: None)
    model = from_hf_model(tiny_lm.hf_model)
    assert model.rowops is None
    prompt = tiny_lm.tokenizer.encode("the cat sat on the mat and", add_special_tokens=False)
    runs = []
    for layout in SlotCache.LAYOUTS:
        slots = SlotCache(model.cfg, model.dtype, "cpu", layout)
        slots.reserve(rows, len(prompt) + 8)
        tokens, steps = model.step(None, slots, [prompt] * rows).argmax(-1), []
        for _ in range(6):
            logits = model.step(tokens, slots, [])
            tokens = logits.argmax(-1)
            steps.append(logits)
        runs.append(torch.stack(steps))
    assert torch.allclose(runs[0], runs[1], atol=1e-5)


@needs_compiler
def test_decode_steps_on_an_unpadded_kv_cache_take_the_kernels_and_agree_with_torchs_ops(tiny_lm, monkeypatch):
    """Beam search's steps (`forward` of one token per row on a KVCache, no padding) run the row
    kernels, with logits within 1e-5 of torch's ops (the same model with them off) and the same
    cache; a step whose rows carry padding keeps torch's masked attention."""
    from aigc_cli.models.gpt2 import GPT2, from_hf_model

    model = from_hf_model(tiny_lm.hf_model)
    assert model.rowops is not None
    fused_steps = []
    real = GPT2._decode_fused
    monkeypatch.setattr(GPT2, "_decode_fused", lambda self, *a: fused_steps.append(a[0].shape[0]) or real(self, *a))
    prompt = torch.tensor([tiny_lm.tokenizer.encode("the cat sat on the mat and", add_special_tokens=False)])
    width, ops = prompt.shape[1], model.rowops
    runs = []
    for kernels in (True, False):
        model.rowops = ops if kernels else None
        cache = model.new_cache(1, width + 8)
        h = model.forward(prompt, torch.arange(width)[None], torch.ones_like(prompt), cache)
        cache.repeat_interleave(3)
        tokens, steps = model.logits(h[:, -1]).argmax(-1).repeat(3)[:, None] + torch.tensor([[0], [1], [2]]), []
        for n in range(width, width + 6):
            h = model.forward(tokens, torch.full((3, 1), n), torch.ones((3, n + 1), dtype=torch.long), cache)
            steps.append(model.logits(h[:, -1]))
            tokens = steps[-1].argmax(-1)[:, None]
        runs.append((torch.stack(steps), cache.k[:, :, :, : width + 6].clone(), cache.v[:, :, :, : width + 6].clone()))
    model.rowops = ops
    assert fused_steps == [3] * 6
    assert torch.allclose(runs[0][0], runs[1][0], atol=1e-5) and torch.equal(runs[0][0].argmax(-1), runs[1][0].argmax(-1))
    assert torch.allclose(runs[0][1], runs[1][1], atol=1e-5) and torch.allclose(runs[0][2], runs[1][2], atol=1e-5)
    cache = model.new_cache(2, width + 2)  # two rows, the second left-padded by one position
    mask = torch.ones((2, width), dtype=torch.long)
    mask[1, 0] = 0
    model.forward(prompt.repeat(2, 1), (mask.cumsum(-1) - 1).clamp(min=0), mask, cache)
    model.forward(torch.tensor([[5], [6]]), torch.tensor([[width], [width - 1]]), torch.cat([mask, torch.ones((2, 1), dtype=torch.long)], 1), cache)
    assert fused_steps == [3] * 6  # the padded step did not take them

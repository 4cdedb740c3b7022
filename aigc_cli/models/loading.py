"""Model resolution and loading: built-in, local directory, Hub cache or Hub download; fail fast offline."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from aigc_cli.core import jsondata
from aigc_cli.core.caches import cache_dir, file_identity
from aigc_cli.core.errors import ModelUnavailableError, UsageError
from aigc_cli.core.modelspec import ModelSpec
from aigc_cli.core.tokenizer import FastTokenizer, load_fast, load_wordpiece
from aigc_cli.models.conventions import Conventions, fix_config_ids, settle
from aigc_cli.models.tiny import TINY_MODELS

if TYPE_CHECKING:
    from aigc_cli.models.backends import Backend

_LFS_MAGIC = b"version https://git-lfs.github.com/spec"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_HUB_PROBE_TIMEOUT_S = 3.0
OFFLINE_HINT = "pass --model PATH (a local model directory) or --model tiny-random for a smoke test"


@dataclass(frozen=True)
class Resolution:
    """Where a --model value points, decided without loading anything heavy."""

    name: str
    kind: str  # "builtin" | "local" | "hub-cache" | "hub"
    path: str | None  # local directory or cached snapshot


@dataclass
class LoadedModel:
    model: Backend  # the forward pass used for decoding and scoring: aigc's native GPT-2, or a transformers model behind the adapter
    tokenizer: Any
    name: str
    source: Resolution
    device: str
    dtype: str
    context_length: int
    quantize: str = "none"
    _hf: Any = None  # transformers' model, loaded only when needed (beam search, other architectures)
    conventions: Conventions | None = None  # its start, end and pad tokens and prompt prefix (models.conventions)

    @property
    def native(self) -> bool:
        """aigc's own GPT-2 forward pass (not a transformers model behind the adapter)."""
        from aigc_cli.models.backends import TransformersBackend

        return not isinstance(self.model, TransformersBackend)

    @property
    def hf_model(self) -> Any:
        """transformers' model with the same weights (beam search uses its `generate`)."""
        if self._hf is None:
            import torch

            if self.source.kind == "builtin":  # built from the same weights as the native model
                _quiet_transformers()
                from aigc_cli.models import tiny

                model = tiny.hf_model(tiny.spec(self.name))
            else:
                model, _ = _load_pretrained(self.source, getattr(torch, self.dtype), tokenizer=False)
            self._hf = _finish_hf(model, self.tokenizer, self.device, getattr(torch, self.dtype))
        return self._hf

    @functools.cached_property
    def revision(self) -> str:
        """Provenance: the Hub commit, a hash of a local directory's weights, or "builtin"; with
        "+int8", "+bfloat16"... when the weights run in another precision than float32 (other outputs)."""
        if self.source.kind == "builtin":
            base = "builtin"
        elif self.source.kind == "local":
            base = weights_sha256(Path(self.source.path or "."))
        else:
            base = getattr(getattr(self.model, "config", None), "_commit_hash", None) or (
                Path(self.source.path).name if self.source.path else "unknown"
            )
        precision = self.quantize if self.quantize != "none" else self.dtype
        return base if precision == "float32" else f"{base}+{precision}"


def weights_sha256(path: Path) -> str:
    """sha256 over a model directory's weight files, computed only when provenance is written and
    remembered in ~/.cache/aigc by (path, size, mtime) so that later runs do not read 500 MB again."""
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    key = json.dumps([file_identity(f) for f in files])
    cache = cache_dir() / "weights-sha256.json"
    try:
        known = jsondata.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    value = "sha256:" + digest.hexdigest()[:16]
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({**known, key: value}))
    except OSError:
        pass  # a read-only home only costs the hash again next time
    return value


def resolve(name: str) -> Resolution:
    """Decide where `name` comes from; raises ModelUnavailableError with a fix when it cannot come from anywhere."""
    if name in TINY_MODELS:
        return Resolution(name, "builtin", None)
    path = Path(name).expanduser()
    if path.is_dir():
        check_local_dir(path)
        return Resolution(name, "local", str(path))
    if _looks_like_path(name):
        raise ModelUnavailableError(f"--model: no such directory: {name}", hint=OFFLINE_HINT)
    snapshot = _cached_snapshot(name)
    if snapshot is not None:
        return Resolution(name, "hub-cache", snapshot)
    offline = next((var for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if _env_true(var)), None)
    if offline is not None:
        raise ModelUnavailableError(f"--model {name}: not in the Hugging Face cache and {offline} is set", hint=OFFLINE_HINT)
    if not _hub_reachable():
        raise ModelUnavailableError(
            f"--model {name}: not in the Hugging Face cache and the Hub ({_hub_endpoint()}) cannot be reached",
            hint=OFFLINE_HINT,
        )
    return Resolution(name, "hub", None)


def check_local_dir(path: Path) -> None:
    """Raise ModelUnavailableError naming the file when a model directory is incomplete or corrupt."""
    if not (path / "config.json").is_file():
        raise ModelUnavailableError(f"--model {path}: no config.json in this directory")
    weights = [path / f for f in _WEIGHT_FILES if (path / f).is_file()]
    if not weights:
        raise ModelUnavailableError(
            f"--model {path}: no weights file (expected one of {', '.join(_WEIGHT_FILES)})"
        )
    first = weights[0]
    files = [first]
    if first.name.endswith(".index.json"):
        try:
            index = jsondata.loads(first.read_text())
            files = [path / f for f in sorted(set(index["weight_map"].values()))]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelUnavailableError(f"{first}: unreadable weights index ({exc})") from None
    for f in files:
        _check_weights_file(f)


def _check_weights_file(f: Path) -> None:
    if not f.is_file():
        raise ModelUnavailableError(f"{f}: weights file is missing")
    size = f.stat().st_size
    with f.open("rb") as fh:
        head = fh.read(min(size, 200))
        if head.startswith(_LFS_MAGIC):
            raise ModelUnavailableError(
                f"{f}: this is a git-lfs pointer file, not the weights ({size} bytes)",
                hint="run `git lfs pull` in the model directory, or download the weights again",
            )
        if f.suffix != ".safetensors":
            return
        if size < 8:
            raise ModelUnavailableError(f"{f}: truncated safetensors file ({size} bytes)")
        fh.seek(0)
        header_len = int.from_bytes(fh.read(8), "little")
        if 8 + header_len > size:
            raise ModelUnavailableError(f"{f}: truncated safetensors file (header says {header_len} bytes, file has {size})")
        try:
            header = jsondata.loads(fh.read(header_len))
        except ValueError:
            raise ModelUnavailableError(f"{f}: corrupt safetensors header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise ModelUnavailableError(
            f"{f}: truncated safetensors file ({size} bytes, {8 + header_len + end} expected)"
        )


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/") and name.count("/") > 1


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _hub_reachable() -> bool:
    """A quick TCP probe, so an offline machine fails in seconds instead of transformers' ~50 s of retries."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or _hub_endpoint())
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _cached_snapshot(repo_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid repo id is simply not cached
        return None
    return str(Path(found).parent) if isinstance(found, str) else None


def _import_torch() -> None:
    """The process's first `import torch` (a command's start-up), with Python's cyclic garbage
    collector paused: importing torch makes ~170k objects and set off three full collections
    (0.12 s of the README example's start, measured with gc.callbacks). Afterwards every object
    alive is frozen (gc.freeze: later full collections skip torch's modules and functions; the
    ~7k objects of garbage the import leaves stay in memory) and collection resumes. Nothing
    happens when torch is imported already (a test process, the server's second load)."""
    import gc
    import sys

    if "torch" in sys.modules or not gc.isenabled():
        return
    gc.disable()
    try:
        import torch  # noqa: F401
    finally:
        gc.freeze()
        gc.enable()


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available on this machine (try --device auto)")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: Apple MPS is not available on this machine (try --device auto)")
    return requested


def pick_dtype(requested: str, device: str) -> Any:
    import torch

    if requested == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device == "mps" else torch.float32
    if requested == "float16" and device == "cpu":
        raise UsageError("--dtype float16: not supported on CPU (use float32 or bfloat16)")
    return getattr(torch, requested)


def load(spec: ModelSpec | str, device: str = "auto", dtype: str = "auto", quantize: str = "none") -> LoadedModel:
    """Resolve and load model + tokenizer once; the only place that touches transformers' loaders.
    `spec` is the parsed model spec (a bare name is parsed with `device`, `dtype` and `quantize`)."""
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec, device, dtype, quantize)
    name, device, dtype, quantize = spec.name, spec.device, spec.dtype, spec.quantize
    res = resolve(name)
    _import_torch()
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    _check_quantize(quantize, dev, torch_dtype)
    from aigc_cli.models.backends import TransformersBackend
    from aigc_cli.models.checkpoint import read_config
    from aigc_cli.models.gpt2 import from_state_dict, load_gpt2

    hf = native = None
    if res.kind == "builtin":  # drawn with plain torch, no transformers: see models/tiny.py
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")  # as for transformers' models
        from aigc_cli.models import tiny

        shape = tiny.spec(name)
        tokenizer = tiny.tokenizer(name)
        native = from_state_dict(shape.config(), tiny.weights(shape), dev, torch_dtype, quantize)
    else:
        if res.kind == "hub":  # download once into the cache, then load like a local directory
            res = Resolution(res.name, "hub-cache", _download(res.name))
        # A plain GPT-2 needs nothing from transformers: its own forward pass, the tokenizers library.
        # (The tokenizer parses in a thread meanwhile, 0.1 s of GPT-2's start-up; the model load ends
        # by handing back the heap pages both freed.)
        folder = Path(res.path or ".")
        read_config(folder)  # a broken config.json is named as such, not as a tokenizer failure
        with ThreadPoolExecutor(max_workers=1) as pool:  # the tokenizer parses while the weights load
            reading = pool.submit(_read_tokenizer, folder)
            try:
                native = load_gpt2(folder, dev, torch_dtype, quantize)
            finally:
                fast = reading.result()  # its error, if any, comes first, as when it loaded first
        tokenizer = (fast if native is not None else None) or _load_tokenizer(res)
        if native is None:
            if quantize != "none":
                raise UsageError(
                    f"--quantize {quantize}: only for GPT-2 checkpoints with safetensors weights; "
                    f"{name} runs through transformers (drop --quantize)"
                )
            _preflight(folder, torch_dtype)
            hf, _ = _load_pretrained(res, torch_dtype, tokenizer=False)
    conventions = settle(tokenizer, Path(res.path) if res.path else None, _where(res))
    if hf is not None:
        hf = _finish_hf(hf, tokenizer, dev, torch_dtype)
    model: Backend
    if native is not None:
        model, context = native, native.cfg.n_positions
    else:
        assert hf is not None  # one of the two loaded
        model, context = TransformersBackend(hf), _context_of(hf.config)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source=res,
        device=dev,
        dtype=str(torch_dtype).removeprefix("torch."),
        context_length=int(context),
        quantize=quantize,
        _hf=hf if native is None else None,  # built when asked for (LoadedModel.hf_model)
        conventions=conventions,
    )


def _where(res: Resolution) -> str:
    """How errors name a model's files."""
    return res.path if res.path else f"--model {res.name}"


def load_tokenizer(name: str, revision: bool = True) -> tuple[Any, str, Conventions]:
    """The tokenizer of a model without its weights, the base of its revision (the weights' hash or
    Hub commit, no precision suffix) and its conventions: what a driver needs when workers hold the
    model. `revision=False` leaves the base out (hashing a local directory reads every weight)."""
    res = resolve(name)
    if res.kind == "builtin":
        from aigc_cli.models import tiny

        tokenizer, base = tiny.tokenizer(name), "builtin"
    else:
        if res.kind == "hub":
            res = Resolution(res.name, "hub-cache", _download(res.name))
        path = Path(res.path or ".")
        tokenizer = load_fast(path) or load_wordpiece(path) or _load_tokenizer(res)
        base = weights_sha256(path) if res.kind == "local" and revision else path.name  # (hashing reads every weight)
    return tokenizer, base, settle(tokenizer, Path(res.path) if res.path else None, _where(res))


def load_trainable(name: str, device: str) -> tuple[Any, Any, int]:
    """(transformers model in float32 on `device`, ready to train; its tokenizer; its context) for
    fine-tuning: the same resolution and checks as `load`, never remote code."""
    import torch

    _quiet_transformers()
    res = resolve(name)
    if res.kind == "builtin":  # transformers' model with the native weights, transformers' tokenizer
        from aigc_cli.models import tiny

        model, tokenizer = tiny.build_hf(name)
    else:
        if res.kind == "hub":
            res = Resolution(res.name, "hub-cache", _download(res.name))
        from aigc_cli.models.checkpoint import read_config

        read_config(Path(res.path or "."))
        _preflight(Path(res.path or "."), torch.float32)
        tokenizer = _load_tokenizer(res)
        model, _ = _load_pretrained(res, torch.float32, tokenizer=False)
    conventions = settle(tokenizer, Path(res.path) if res.path else None, _where(res))
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            fix_config_ids(config, conventions, len(tokenizer))
    model = model.to(device=device, dtype=torch.float32).train()
    return model, tokenizer, int(_context_of(model.config))


def _preflight(path: Path, dtype: Any) -> None:
    """Before transformers builds a model: its config is readable, the weights hold the tensors
    the config implies, and they fit in memory (else exit 3, naming the file)."""
    from aigc_cli.models.checkpoint import (
        check_fits,
        check_matches,
        expected_hf_shapes,
        read_config,
        stored_shapes,
    )

    config = read_config(path)
    stored, _, where = stored_shapes(path)
    expected, optional, size = expected_hf_shapes(config, where)
    check_matches(where, expected, stored, optional)
    check_fits(where, size // 4 * dtype.itemsize)


def _check_quantize(quantize: str, device: str, dtype: Any) -> None:
    import torch

    if quantize == "none":
        return
    if device != "cpu":
        raise UsageError(f"--quantize {quantize}: a CPU mode (fbgemm kernels); on {device} use --dtype float16 or bfloat16")
    if dtype != torch.float32:
        raise UsageError(f"--quantize {quantize}: cannot be combined with --dtype {str(dtype).removeprefix('torch.')}")


def _context_of(config: Any) -> int:
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 1024


def _finish_hf(model: Any, tokenizer: Any, device: str, dtype: Any) -> Any:
    model = model.to(device=device, dtype=dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _download(repo_id: str) -> str:
    """Fetch config, tokenizer and weights once into the Hugging Face cache: safetensors when the
    repository has them (never both formats), else its PyTorch .bin weights."""
    from huggingface_hub import HfApi, snapshot_download

    patterns = ["*.json", "*.txt", "*.model", "tokenizer*"]
    try:
        files = HfApi().list_repo_files(repo_id)
        patterns.append("*.safetensors" if any(f.endswith(".safetensors") for f in files) else "pytorch_model*.bin")
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as exc:
        raise ModelUnavailableError(f"--model {repo_id}: cannot download ({_first_line(exc)})", hint=OFFLINE_HINT) from exc


def _read_tokenizer(folder: Path) -> FastTokenizer | None:
    """A directory's own tokenizer (load_fast, else load_wordpiece), with what prompt checks ask of
    it first worked out (its longest token): run in a thread while the weights load."""
    tok = load_fast(folder) or load_wordpiece(folder)
    if tok is not None:
        tok.longest_token  # noqa: B018 - computed now, cached on the tokenizer
    return tok


def _load_tokenizer(res: Resolution) -> Any:
    _quiet_transformers()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(res.path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ModelUnavailableError(f"--model {res.name}: cannot load the tokenizer ({_first_line(exc)})") from exc


def _load_pretrained(res: Resolution, torch_dtype: Any, tokenizer: bool = True) -> tuple[Any, Any]:
    """transformers' model (and tokenizer): safetensors by default, never remote code."""
    _quiet_transformers()
    from transformers import AutoModelForCausalLM

    source = res.path if res.kind in ("local", "hub-cache") and res.path is not None else res.name
    local_only = res.kind != "hub"
    tok = _load_tokenizer(res) if tokenizer else None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, local_files_only=local_only, trust_remote_code=False
        )
    except Exception as exc:
        raise ModelUnavailableError(f"--model {res.name}: cannot load the weights ({_first_line(exc)})") from exc
    return model, tok


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _quiet_transformers() -> None:
    """No pad-token, attention-mask or generation-flag warnings reach the user."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")

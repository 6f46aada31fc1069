"""Save and load a :class:`~purenn.PurifiedModel` as one safetensors file.

The file holds

- the base model's ``state_dict`` under ``base_model.`` (keys otherwise unchanged, so
  ``{k[len("base_model."):]: v}`` loads straight into the original ResNet);
- each purified layer's tensors under ``purenn.<layer>.<name>``: ``neurons``, ``centroids``,
  ``n_clusters``, ``scores``, ``ref_counts``, ``ref_indices``, ``ref_clusters`` and
  ``merge_weight`` (the suppression mask: 1 on, 0 suppressed);
- a JSON config in the safetensors metadata under ``"purenn"``: format and purenn version, the
  base architecture (torchvision builder name when it is one, or the timm model name and the
  arguments that rebuild it; block layout, stem, input channels, classes, a structural fingerprint),
  and per layer its :meth:`PureLayer.config` (layer, upstream,
  rule, ...), neurons, clusters per neuron, scores and suppressed virtual neurons.

A second metadata entry, ``"purenn_sha256"``, holds content hashes: SHA-256 of the config text and,
per tensor, of its name, dtype, shape and bytes.

Loading never unpickles (safetensors holds raw tensors, the config is JSON) and checks the file
before using it: every tensor is there with the shape and dtype the architecture gives; every value
is what it may be (finite weights and centroids, non-negative BatchNorm variances, merge weights 0
or 1, cluster counts, reference counts, reference indices and clusters in range, finite scores);
every config value fits the architecture and the tensors (layers, upstream layers, channels, gate,
a ``skip_aware`` that needs an identity skip only where there is one, the suppressed list); then the
content hashes, naming the first tensor that differs from what was saved (``verify=False`` skips
only this last check, for files edited on purpose; files saved before hashes existed load with a
warning). Anything else raises :class:`~purenn.errors.FileFormatError`, and nothing is written into
a given skeleton before every check passed. Writes go to a temporary file next to the target and
are renamed into place, so a failed write never leaves a partial file.

Example:
    >>> pm.save("pure.safetensors")                                  # doctest: +SKIP
    >>> pm2 = purenn.load_purified("pure.safetensors")                # doctest: +SKIP
    >>> torch.equal(pm2(x), pm(x))                                    # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from purenn._version import __version__
from purenn.attribution.relevance import has_identity_path
from purenn.attribution.rules import RULES, rule_from_config
from purenn.common.checks import check_device
from purenn.common.choices import is_score_kind
from purenn.common.distributed import writes_on_rank_zero
from purenn.errors import ConfigError, FileFormatError, LayerError, PurennError
from purenn.io.architecture import _arch_difference, _arch_name, _fingerprint, build_base_model, describe_architecture
from purenn.io.files import as_path, resolve_target, write_chunks
from purenn.io.refdata import validate_record
from purenn.model.gates import CIRCUIT_GATES
from purenn.model.pure_layer import PureLayer
from purenn.model.purified import PurifiedModel

__all__ = [
    "FORMAT_VERSION",
    "save_purified",
    "load_purified",
    "read_config",
    "content_hashes",
]

#: version of the file layout; files with a higher number are refused
FORMAT_VERSION = 1
METADATA_KEY = "purenn"
HASH_KEY = "purenn_sha256"
_INT_KEYS = ("neurons", "n_clusters", "ref_counts", "ref_indices", "ref_clusters")
BASE_PREFIX = "base_model."
PURE_PREFIX = "purenn."
MERGE_KEY = "merge_weight"


# ---------------------------------------------------------------------------------------- save
def _layer_entry(pl: PureLayer) -> dict[str, Any]:
    return {
        "config": pl.config(),
        "neurons": pl.neurons.tolist(),
        "n_clusters": pl.n_clusters.tolist(),
        "scores": [round(float(s), 6) for s in pl.scores.tolist()],
        "suppressed": torch.nonzero(pl.merge_weight == 0).flatten().tolist(),
    }


def _layer_tensors(pl: PureLayer) -> dict[str, Tensor]:
    names = (*PureLayer.TENSOR_KEYS, MERGE_KEY)
    return {f"{PURE_PREFIX}{pl.layer}.{n}": getattr(pl, n) for n in names}


def _tensor_hash(name: str, t: Tensor) -> str:
    h = hashlib.sha256(json.dumps([name, str(t.dtype).replace("torch.", ""), list(t.shape)]).encode())
    h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def content_hashes(tensors: Mapping[str, Tensor], config_text: str) -> dict[str, Any]:
    """The content hashes stored next to the config: SHA-256 of ``config_text`` and, per tensor, of
    its name, dtype, shape and bytes.

    Example:
        >>> h = content_hashes({"w": torch.zeros(2)}, "{}")
        >>> h["algorithm"], sorted(h["tensors"]), len(h["config"])
        ('sha256', ['w'], 64)
    """
    return {
        "algorithm": "sha256",
        "config": hashlib.sha256(config_text.encode()).hexdigest(),
        "tensors": {name: _tensor_hash(name, tensors[name]) for name in sorted(tensors)},
    }


def _write_atomic(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    """Serialise in memory, then write with :func:`purenn.io.files.write_chunks` (temporary file next to
    the target, renamed into place; stale temporary files of killed runs removed; normal file mode;
    a symlink is written through)."""
    write_chunks(path, [safetensors_save(tensors, metadata=metadata)], "file name such as 'model.safetensors'")


@writes_on_rank_zero
def save_purified(pm: PurifiedModel, path: str | os.PathLike) -> Path:
    """Write ``pm`` to one safetensors file (see the module docstring for the layout).

    The write is atomic: the file appears at ``path`` complete or not at all (an existing file
    stays as it was if writing fails). The temporary file ``.NAME.purenn-tmp-<pid>-<random>`` lies
    next to ``path``; one left by a killed save is removed by the next save to ``path``. The file gets
    a normal file's mode (an existing file's mode, else ``0o666`` less the umask); a symbolic link
    is written through (the file it points to is replaced). A missing directory raises
    :class:`~purenn.errors.ConfigError` naming it.
    Under torch.distributed only rank 0 writes; the other ranks wait for it and write nothing.

    Returns:
        The path written.

    Example:
        >>> purenn.io.format.save_purified(pm, "pure.safetensors")     # doctest: +SKIP
        PosixPath('pure.safetensors')
    """
    if not isinstance(pm, PurifiedModel):
        raise ConfigError(f"save_purified needs a PurifiedModel, got {type(pm).__name__}.")
    path = as_path(path)
    resolve_target(path, "file name such as 'model.safetensors'")  # before any work: a missing directory, ...
    pm._check_base()  # a model converted behind pm's back, or one on the meta device, holds nothing to save
    config = {
        "format_version": FORMAT_VERSION,
        "purenn_version": __version__,
        "architecture": describe_architecture(pm.base_model),
        "max_memory": int(pm.max_memory),
        "layers": [_layer_entry(pm.pure_layer(name)) for name in pm.layers],
    }
    if getattr(pm, "reference_data", None):
        config["reference_data"] = pm.reference_data
    tensors: dict[str, Tensor] = {BASE_PREFIX + k: v for k, v in pm.base_model.state_dict().items()}
    for name in pm.layers:
        tensors.update(_layer_tensors(pm.pure_layer(name)))
    # safetensors refuses shared or non-contiguous storage: write independent contiguous copies
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    text = json.dumps(config, separators=(",", ":"))
    metadata = {"format": "pt", METADATA_KEY: text,
                HASH_KEY: json.dumps(content_hashes(tensors, text), separators=(",", ":"))}
    _write_atomic(tensors, metadata, path)
    return path


# ---------------------------------------------------------------------------------------- load
def _open_error(path: Path, err: Exception) -> FileFormatError:
    return FileFormatError(
        f"{str(path)!r} is not a readable safetensors file (truncated or corrupted?): {err}. "
        "Write it again with PurifiedModel.save()."
    )


def _parse_config(path: Path, metadata: Mapping[str, str] | None) -> dict[str, Any]:
    if not metadata or METADATA_KEY not in metadata:
        raise FileFormatError(
            f"{str(path)!r} is a safetensors file but not a purenn model: its metadata has no "
            f"{METADATA_KEY!r} entry. Save purified models with PurifiedModel.save()."
        )
    try:
        config = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise FileFormatError(f"the purenn config in {str(path)!r} is not valid JSON ({e}).") from None
    if not isinstance(config, dict):
        raise FileFormatError(
            f"the purenn config in {str(path)!r} must be a JSON object, got {type(config).__name__}."
        )
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise FileFormatError(
            f"{str(path)!r} has an unknown purenn format version {version!r}; this purenn "
            f"({__version__}) reads format versions 1..{FORMAT_VERSION}."
        )
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{str(path)!r} was written in purenn format version {version} (by purenn "
            f"{config.get('purenn_version', '?')}); this purenn ({__version__}) reads versions up to "
            f"{FORMAT_VERSION}. Upgrade purenn to load it."
        )
    for key, kind in (("architecture", dict), ("layers", list)):
        if not isinstance(config.get(key), kind):
            raise FileFormatError(
                f"the purenn config in {str(path)!r} lacks {key!r} (a JSON {kind.__name__})."
            )
    for i, entry in enumerate(config["layers"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("config"), dict)
                and isinstance(entry["config"].get("layer"), str)):
            raise FileFormatError(
                f"layer entry {i} of the purenn config in {str(path)!r} has no 'config' with a 'layer' name."
            )
    return config


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON config of a saved purified model, without loading its tensors.

    Example:
        >>> purenn.io.format.read_config("pure.safetensors")["architecture"]["builder"]   # doctest: +SKIP
        'resnet50'
    """
    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {str(path)!r}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
    except SafetensorError as e:
        raise _open_error(path, e) from None
    return _parse_config(path, metadata)


def _stored_dtype(arch: Mapping[str, Any], path: Path) -> torch.dtype:
    name = arch.get("dtype", "float32")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise FileFormatError(
            f"the architecture in {str(path)!r} names dtype {name!r}; a purified model's weights are floating point."
        )
    return dtype


def _base_skeleton(arch: dict[str, Any], model: nn.Module | None, path: Path) -> nn.Module:
    """The base model to load into: rebuilt (``model=None``) or the given skeleton, checked but not
    changed (it is converted and written only after every check of the file passed)."""
    if model is None:
        if str(arch.get("family", "")).startswith("timm") and arch.get("timm_model"):
            build_base_model(arch, device="meta")  # says what to install when timm is missing
        if not arch.get("rebuildable", False):
            raise FileFormatError(
                f"the base model in {str(path)!r} is a customised ResNet that cannot be rebuilt from its "
                "description; pass a skeleton of it: load_purified(path, model=MyResNet())."
            )
        model = build_base_model(arch)
        if _fingerprint(model) != arch.get("fingerprint"):
            raise FileFormatError(
                f"rebuilding the base model of {str(path)!r} gave a different structure; pass a skeleton of "
                "it: load_purified(path, model=...)."
            )
        return model
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model must be an nn.Module skeleton of the base ResNet, got {type(model).__name__}."
        )
    given = describe_architecture(model)
    if given["fingerprint"] != arch.get("fingerprint"):
        raise FileFormatError(
            f"the model given as model= does not fit {str(path)!r}: {_arch_difference(arch, given)}. "
            f"Pass a skeleton of the saved architecture ({_arch_name(arch)}) or model=None "
            "to rebuild it."
        )
    return model


def _short(keys: list[str], n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _check_tensors(path: Path, expected: Mapping[str, Tensor], found: Mapping[str, Tensor],
                   check_shape: bool) -> None:
    missing = set(expected) - set(found)
    extra = set(found) - set(expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_short(list(missing))}")
        if extra:
            parts.append(f"unexpected tensors: {_short(list(extra))}")
        raise FileFormatError(f"{str(path)!r} does not fit the stored architecture: {'; '.join(parts)}.")
    if check_shape:
        for k, ref in expected.items():
            t = found[k]
            if t.shape != ref.shape:
                raise FileFormatError(
                    f"tensor {k!r} in {str(path)!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}."
                )
            if t.dtype != ref.dtype:
                raise FileFormatError(
                    f"tensor {k!r} in {str(path)!r} has dtype {t.dtype}, expected {ref.dtype}."
                )


def _check_base_values(path: Path, tensors: Mapping[str, Tensor]) -> None:
    """Finite floating-point weights and statistics, non-negative BatchNorm variances."""
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FileFormatError(f"tensor {k!r} in {str(path)!r} holds NaN or infinite values.")
        if k.endswith("running_var") and bool((t < 0).any()):
            raise FileFormatError(f"tensor {k!r} in {str(path)!r} holds negative BatchNorm variances.")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_layer_config(path: Path, cfg: Mapping[str, Any]) -> None:
    """Types and ranges of a layer's plain config values (the rest is checked against the model)."""
    layer = cfg["layer"]

    def bad(key: str, what: str) -> FileFormatError:
        return FileFormatError(
            f"layer {layer!r} in {str(path)!r}: config {key!r} is {cfg.get(key)!r}; it must be {what}."
        )

    if "upstream" in cfg and not isinstance(cfg["upstream"], str):
        raise bad("upstream", "a layer name")
    if "channels" in cfg and not (_is_int(cfg["channels"]) and cfg["channels"] > 0):
        raise bad("channels", "a positive integer")
    if "skip_aware" in cfg and not isinstance(cfg["skip_aware"], bool):
        raise bad("skip_aware", "true or false")
    if "rule" in cfg:
        try:
            rule_from_config(cfg["rule"])
        except ConfigError:
            raise bad("rule", f"one of {', '.join(repr(r) for r in RULES)} or such a rule's parameters") from None
    if "gate" in cfg and not isinstance(cfg["gate"], str):
        raise bad("gate", "a gate name")
    w = cfg.get("gate_weight", 0.5)
    if not _is_number(w) or not math.isfinite(w) or w < 0:
        raise bad("gate_weight", "a finite number >= 0")
    if not is_score_kind(cfg.get("score_kind")):
        raise bad("score_kind", "null or a short lower-case score name")


def _check_layer_tensors(path: Path, layer: str, tensors: Mapping[str, Tensor], dtype: torch.dtype) -> None:
    """Dtypes and dimensions of a layer's tensors, before they are used."""
    for key in _INT_KEYS:
        if tensors[key].dtype != torch.int64:
            raise FileFormatError(
                f"tensor '{PURE_PREFIX}{layer}.{key}' in {str(path)!r} has dtype {tensors[key].dtype}, expected "
                "torch.int64."
            )
    for key, allowed in (("centroids", (dtype,)), (MERGE_KEY, (dtype,)), ("scores", (torch.float32, dtype))):
        if tensors[key].dtype not in allowed:
            raise FileFormatError(
                f"tensor '{PURE_PREFIX}{layer}.{key}' in {str(path)!r} has dtype {tensors[key].dtype}, expected "
                f"{' or '.join(str(d) for d in dict.fromkeys(allowed))}."
            )
    for key, ndim in (("neurons", 1), ("n_clusters", 1), ("scores", 1), (MERGE_KEY, 1), ("centroids", 3),
                      ("ref_counts", 2), ("ref_indices", 2), ("ref_clusters", 2)):
        if tensors[key].ndim != ndim:
            raise FileFormatError(
                f"tensor '{PURE_PREFIX}{layer}.{key}' in {str(path)!r} has {tensors[key].ndim} dimensions, "
                f"expected {ndim}."
            )
    c_max, n_cl = tensors["centroids"].shape[1], tensors["n_clusters"]
    if n_cl.numel() and (int(n_cl.min()) < 1 or int(n_cl.max()) > c_max):
        raise FileFormatError(
            f"tensor '{PURE_PREFIX}{layer}.n_clusters' in {str(path)!r} holds counts outside 1..{c_max} (the "
            "centroid rows per neuron)."
        )


def _check_layer_values(path: Path, entry: Mapping[str, Any], pl: PureLayer) -> None:
    """The values of a built layer: what each tensor may hold, and the config entry agreeing with them."""
    layer = pl.layer

    def bad(key: str, what: str) -> FileFormatError:
        return FileFormatError(f"tensor '{PURE_PREFIX}{layer}.{key}' in {str(path)!r} {what}.")

    k, c_max = pl.centroids.shape[:2]
    if pl.scores.shape != (k,):
        raise bad("scores", f"has shape {tuple(pl.scores.shape)}, expected ({k},)")
    if not bool(torch.isfinite(pl.centroids).all()):
        raise bad("centroids", "holds NaN or infinite values")
    if not bool(torch.isfinite(pl.scores).all()):
        raise bad("scores", "holds NaN or infinite values")
    w = pl.merge_weight
    if not bool(((w == 0) | (w == 1)).all()):
        odd = w[(w != 0) & (w != 1)][0].item()
        raise bad(MERGE_KEY, f"holds {odd!r}; merge weights are 0 (suppressed) or 1")
    n_cl = pl.n_clusters
    counts = pl.ref_counts
    if bool((counts < 0).any()):
        raise bad("ref_counts", "holds negative counts")
    beyond = torch.arange(c_max)[None] >= n_cl[:, None]
    if bool((counts[beyond] != 0).any()):
        raise bad("ref_counts", "counts references in clusters a neuron does not have")
    if pl.ref_indices.shape[1]:
        if bool((pl.ref_indices < 0).any()):
            raise bad("ref_indices", "holds negative data indices")
        rc = pl.ref_clusters
        if bool(((rc < 0) | (rc >= n_cl[:, None])).any()):
            raise bad("ref_clusters", "holds clusters outside 0..n_clusters-1 of their neuron")
        per_cluster = torch.stack([(rc == c).sum(dim=1) for c in range(c_max)], dim=1) if c_max else counts
        if not torch.equal(per_cluster, counts):
            raise bad("ref_counts", "disagrees with the clusters of the reference samples (ref_clusters)")
    where = f"layer {layer!r} in {str(path)!r}: the config's"
    for key in ("neurons", "n_clusters"):
        if key in entry and entry[key] != getattr(pl, key).tolist():
            raise FileFormatError(f"{where} {key!r} disagrees with the stored tensor.")
    if "suppressed" in entry and entry["suppressed"] != torch.nonzero(w == 0).flatten().tolist():
        raise FileFormatError(f"{where} 'suppressed' disagrees with the stored merge weights.")
    scores = entry.get("scores")
    if scores is not None:
        stored = pl.scores.tolist()
        close = isinstance(scores, list) and len(scores) == len(stored) and all(
            _is_number(a) and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-5) for a, b in zip(scores, stored))
        if not close:
            raise FileFormatError(f"{where} 'scores' disagrees with the stored tensor.")


def _build_layer(path: Path, entry: dict[str, Any], tensors: dict[str, Tensor], dtype: torch.dtype) -> PureLayer:
    cfg = dict(entry["config"])
    layer = cfg["layer"]
    unknown = sorted(set(cfg) - set(PureLayer.CONFIG_KEYS))
    if unknown:
        warnings.warn(
            f"{str(path)!r}: ignoring unknown config keys {unknown} of layer {layer!r} (written by a newer "
            "purenn?).",
            stacklevel=3,
        )
        for k in unknown:
            del cfg[k]
    _check_layer_config(path, cfg)
    _check_layer_tensors(path, layer, tensors, dtype)
    try:
        pl = PureLayer.from_config(cfg, tensors)
    except KeyError as e:
        raise FileFormatError(f"the config of layer {layer!r} in {str(path)!r} lacks {e}.") from None
    except (PurennError, TypeError, ValueError, RuntimeError) as e:
        raise FileFormatError(
            f"the tensors of layer {layer!r} in {str(path)!r} do not fit together: {e}"
        ) from None
    _check_layer_values(path, entry, pl)
    return pl


def _check_skip_aware(path: Path, pm: PurifiedModel) -> None:
    """``skip_aware`` only for a circuit gate over a segment with an identity skip."""
    for pl, _, blocks, _ in pm._plan.values():
        if pl.skip_aware and (pl.gate not in CIRCUIT_GATES or not has_identity_path(blocks)):
            why = (f"its gate {pl.gate!r} does not use circuits" if pl.gate not in CIRCUIT_GATES else
                   f"no identity skip carries channels from {pl.upstream!r} to {pl.layer!r}")
            raise FileFormatError(
                f"layer {pl.layer!r} in {str(path)!r} is marked skip_aware, which is impossible here: {why}."
            )


def _verify_hashes(path: Path, metadata: Mapping[str, str], found: Mapping[str, Tensor]) -> None:
    raw = metadata.get(HASH_KEY)
    if raw is None:
        warnings.warn(
            f"{str(path)!r} has no content hashes (saved by a purenn before they were added), so it cannot "
            "be checked against what was saved; save it again to add them, or load it with verify=False.",
            UserWarning,
            stacklevel=3,
        )
        return
    try:
        hashes = json.loads(raw)
    except json.JSONDecodeError:
        hashes = None
    if not (isinstance(hashes, dict) and hashes.get("algorithm") == "sha256" and isinstance(hashes.get("config"), str)
            and isinstance(hashes.get("tensors"), dict)):
        raise FileFormatError(f"the content hashes of {str(path)!r} are malformed; the file was edited or damaged.")
    hint = "the file was edited or damaged (load it with verify=False if it was edited on purpose)"
    if hashlib.sha256(metadata[METADATA_KEY].encode()).hexdigest() != hashes["config"]:
        raise FileFormatError(f"the purenn config in {str(path)!r} differs from the one saved: {hint}.")
    stored = hashes["tensors"]
    for name in sorted(set(stored) | set(found)):
        if name not in found:
            raise FileFormatError(f"tensor {name!r} was saved in {str(path)!r} but is missing: {hint}.")
        if name not in stored:
            raise FileFormatError(f"tensor {name!r} in {str(path)!r} was not there when it was saved: {hint}.")
        if _tensor_hash(name, found[name]) != stored[name]:
            raise FileFormatError(f"tensor {name!r} in {str(path)!r} differs from what was saved: {hint}.")


def load_purified(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    device: str | torch.device | None = None,
    verify: bool = True,
) -> PurifiedModel:
    """Load a purified model written by :meth:`PurifiedModel.save`.

    Everything in the file is checked before it is used (see the module docstring); a load that
    fails leaves ``model`` exactly as it was.

    Args:
        path: the safetensors file.
        model: ``None`` to rebuild the base ResNet from the stored architecture (every torchvision
            builder and adapted stems), or a skeleton of it (any weights) for customised ResNets: once
            every check passed it is converted to the stored dtype and its weights are overwritten in
            place, and the purified model shares it. A skeleton of another architecture is refused.
        device: where to put the loaded model (default: CPU). With a skeleton on another device, the
            purified model holds a copy there and the skeleton stays where it is.
        verify: check the content hashes saved with the file: the config and every tensor must be
            what was saved. ``False`` skips only this check (for a file edited on purpose); every
            value is still validated.

    Returns:
        The :class:`PurifiedModel`, in eval mode, with suppressed virtual neurons still suppressed.

    Raises:
        FileFormatError: the file is not a readable safetensors file, not a purenn file, has a bad
            or newer config, missing, extra or misshapen tensors, values a purified model cannot
            hold, contents that differ from what was saved, or does not fit ``model``.

    Example:
        >>> pm2 = purenn.load_purified("pure.safetensors")          # doctest: +SKIP
        >>> skeleton = torchvision.models.resnet50()                      # doctest: +SKIP
        >>> pm2 = purenn.load_purified("pure.safetensors", model=skeleton)  # doctest: +SKIP
        >>> pm3 = purenn.load_purified("edited.safetensors", verify=False)  # doctest: +SKIP
    """
    path = as_path(path)
    if not isinstance(verify, bool):
        raise ConfigError(f"verify must be True or False, got {verify!r}.")
    target = None if device is None else check_device(device)
    if model is not None and not isinstance(model, nn.Module):
        raise ConfigError(
            f"model must be an nn.Module skeleton of the base ResNet, got {type(model).__name__}."
        )
    if not path.is_file():
        raise FileNotFoundError(f"no file at {str(path)!r}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            config = _parse_config(path, metadata)
            found = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise _open_error(path, e) from None
    max_memory = config.get("max_memory")
    if max_memory is not None and not (_is_int(max_memory) and max_memory > 0):
        raise FileFormatError(
            f"the purenn config in {str(path)!r} has max_memory {max_memory!r}; it must be a positive integer."
        )
    dtype = _stored_dtype(config["architecture"], path)
    base = _base_skeleton(config["architecture"], model, path)  # not changed yet

    # 1. every tensor there, with the shape and dtype the architecture gives
    base_expected = {
        BASE_PREFIX + k: torch.empty(v.shape, dtype=dtype if v.is_floating_point() else v.dtype, device="meta")
        for k, v in base.state_dict().items()
    }
    layer_names = [e["config"]["layer"] for e in config["layers"]]
    pure_names = (*PureLayer.TENSOR_KEYS, MERGE_KEY)
    pure_expected = {f"{PURE_PREFIX}{layer}.{n}": torch.empty(0) for layer in layer_names for n in pure_names}
    _check_tensors(path, {**base_expected, **pure_expected}, found, check_shape=False)
    _check_tensors(path, base_expected, {k: found[k] for k in base_expected}, check_shape=True)
    # 2. every value what it may be, every config value consistent with the model and the tensors
    _check_base_values(path, {k: found[k] for k in base_expected})
    layers = []
    for entry, layer in zip(config["layers"], layer_names):
        tensors = {n: found[f"{PURE_PREFIX}{layer}.{n}"] for n in pure_names}
        layers.append(_build_layer(path, entry, tensors, dtype))
    kwargs = {"max_memory": max_memory} if max_memory is not None else {}
    try:
        pm = PurifiedModel(base, layers, **kwargs)  # reads the structure only
    except (LayerError, ConfigError) as e:
        raise FileFormatError(
            f"the purified layers in {str(path)!r} do not fit the base model: {e}"
        ) from None
    _check_skip_aware(path, pm)
    pm.reference_data = validate_record(config.get("reference_data"), repr(str(path)))
    # 3. the contents are what was saved
    if verify:
        _verify_hashes(path, metadata, found)
    # only now write into the base model
    with torch.no_grad():
        if model is not None:
            base.to(dtype)
        base.load_state_dict({k[len(BASE_PREFIX):]: found[k] for k in base_expected}, strict=True)
    pm._owns_base = model is None
    return pm.to(target) if target is not None else pm

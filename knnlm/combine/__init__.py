"""One home for how p_LM and the neighbours are combined: fixed, tuned and adaptive λ, the learned
gate (with retrieval skipping) and SPALM, behind one interface (`Combiner`), used by eval,
tune-lambda, the LogitsProcessor and the KNNLM API.

    combiner = resolve_combiner("adaptive", "datastores/default")
    combiner.target_log_probs(scores)       # (n,) log p(target)

What `tune-lambda` fits lives in the datastore: lambda.json (numbers, settings, held-out
figures) and mixing.safetensors (the gates' weights; never pickle).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..arrays import write_json
from ..errors import KNNLMError, expect
from .gate import LambdaGate, gate_from_tensors
from .policies import AdaptiveLambda, Combiner, FixedLambda, GateLambda, LambdaMix, Skip, SpalmMix
from .spalm import SpalmGate

__all__ = ["Combiner", "LambdaMix", "FixedLambda", "AdaptiveLambda", "GateLambda", "SpalmMix", "Skip",
           "resolve_combiner", "pick_temperature", "load_lambda", "save_lambda", "LAMBDA_FILE", "MIXING_FILE"]

LAMBDA_FORMAT = 2  # 2: the learned gate, the skip threshold and SPALM
LAMBDA_FILE = "lambda.json"
PLOT_FILE = "lambda.png"  # tune-lambda's plot of held-out perplexity against λ, beside lambda.json
MIXING_FILE = "mixing.safetensors"
LAMBDA_WORDS = ("tuned", "adaptive", "gate", "gate-pre")
COMBINE_KINDS = ("mix", "spalm")
# The search settings that tuned values depend on; compared with the current search on use.
SEARCH_KEYS = ("search", "index", "k", "nprobe", "rerank", "retomaton")
SEARCH_DEFAULTS = {"retomaton": "off"}  # absent from settings recorded before RetoMaton, or with it off


def save_lambda(datastore_dir, result: dict, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write lambda.json and the gates' weights beside it as one change of the datastore (its journal: both files or
    neither, also after a kill; refused while another process changes the datastore); returns lambda.json's path."""
    from safetensors.torch import save

    from .. import journal

    directory = Path(datastore_dir)
    if not directory.is_dir():
        raise KNNLMError(f"Datastore directory {directory} does not exist; pass the directory of a built datastore.")
    result, files = dict(result), [LAMBDA_FILE]
    with journal.hold(directory):  # (nested in tune-lambda's own) let go also where the write fails
        pending = journal.begin(directory)
        try:
            if tensors:
                # bytes written here, not by safetensors' save_file, which makes its file readable by its owner only
                data = save({k: v.contiguous() for k, v in tensors.items()})
                (pending / MIXING_FILE).write_bytes(data)
                result["mixing_file"] = {"name": MIXING_FILE, "sha256": hashlib.sha256(data).hexdigest()}
                files.append(MIXING_FILE)
            write_json(pending / LAMBDA_FILE, result)
        except BaseException:
            journal.recover(directory)  # uncommitted: thrown away
            raise
        journal.commit(directory, files)
    return directory / LAMBDA_FILE


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_lambda(datastore_dir) -> dict | None:
    """The content of DATASTORE/lambda.json, or None if it was never tuned."""
    path = Path(datastore_dir) / LAMBDA_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KNNLMError(f"Cannot read {path} ({e}); run `knnlm tune-lambda` again.") from e
    # Format 1 (before the learned gate) still holds a valid λ, T and adaptive schedule; asking it for
    # a gate, SPALM or a skip threshold gets the sentence about a datastore tuned without them.
    if not isinstance(data, dict) or data.get("format") not in (1, LAMBDA_FORMAT):
        raise KNNLMError(f"{path} is not a knnlm λ file (format 1 or {LAMBDA_FORMAT}); run `knnlm tune-lambda` again.")
    return data


def load_mixing_tensors(datastore_dir, data: dict) -> dict[str, torch.Tensor]:
    """The gates' weights named by lambda.json, checked against its recorded hash."""
    from safetensors.torch import load_file

    entry = data.get("mixing_file") or {}
    path = Path(datastore_dir) / entry.get("name", MIXING_FILE)
    if not path.is_file() or _sha256(path) != entry.get("sha256"):
        raise KNNLMError(f"{path} is missing or is not the file tune-lambda wrote with {LAMBDA_FILE}; "
                         "run `knnlm tune-lambda` again.")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types on a damaged file
        raise KNNLMError(f"Cannot read {path} ({e}); run `knnlm tune-lambda` again.") from e


def pick_temperature(given: float | None, datastore_dir, tuned: float | None = None) -> float:
    """T of p_kNN: the one given, else the one tuned with the chosen policy, else lambda.json's, else 1."""
    if given is not None:
        expect(given, (int, float), "temperature", "1.0")
        if not 0 < given < float("inf"):
            raise KNNLMError(f"--temperature {given} must be a positive number; pass e.g. --temperature 1.")
        return float(given)
    if tuned:
        return float(tuned)
    data = (load_lambda(datastore_dir) or {}) if datastore_dir is not None else {}
    return float(data.get("temperature") or 1.0)


def search_settings_note(data: dict, current: dict | None) -> str | None:
    """One line when lambda.json was tuned with other search settings than `current`, else None."""
    if current is None:
        return None
    tuned = {**SEARCH_DEFAULTS, **(((data.get("tuned_on") or {}).get("attrs")) or {})}
    current = {**SEARCH_DEFAULTS, **current}
    # nprobe means nothing to an exact search: comparing it would report a difference that is none.
    keys = [key for key in SEARCH_KEYS if key != "nprobe" or "exact" not in (tuned.get("search"), current.get("search"))]
    diff = [f"{key} {tuned.get(key)!s} → {current.get(key)!s}" for key in keys
            if key in current and key in tuned and str(tuned.get(key)) != str(current.get(key))]
    if not diff:
        return None
    return ("tuned values were fitted with other search settings (" + ", ".join(diff) +
            "); run `knnlm tune-lambda` with these settings to refit them")


def _gate(data: dict, tensors, which: str, path: Path) -> LambdaGate:
    entry = (data.get("gate") or {}).get(which)
    if not entry:
        raise KNNLMError(f"{path} has no learned gate (tuned with --no-gate or by an older knnlm); run "
                         "`knnlm tune-lambda` with the gate on, or pass a number, e.g. --lambda 0.25.")
    return gate_from_tensors(tensors(), f"gate.{which}", entry["shape"])


def _parse_lambda(spec: str) -> float:
    try:
        lam = float(spec)
    except ValueError:
        raise KNNLMError(f"--lambda must be a number in [0, 1] or one of {', '.join(LAMBDA_WORDS)}, not {spec!r}; "
                         "pass e.g. --lambda 0.25.") from None
    if not 0.0 <= lam <= 1.0:  # also refuses nan
        raise KNNLMError(f"--lambda {spec} is outside [0, 1]; pass a number in [0, 1], e.g. --lambda 0.25.")
    return lam


def spalm_lambda_error(lam) -> KNNLMError:
    """The sentence for a λ given with --combine spalm, whose gate reads none."""
    return KNNLMError(f"--combine spalm gates the memory with SPALM's own gate, so --lambda {lam} would do nothing; "
                      "leave --lambda out, or pass --combine mix.")


def resolve_combiner(lam="0.25", datastore_dir=None, combine: str = "mix", skip_below=None,
                     temperature: float | None = None, search: dict | None = None) -> Combiner:
    """Turn the --lambda, --combine, --skip-below and --temperature values into a Combiner.

    Args:
        lam: a number in [0, 1], "tuned", "adaptive", "gate" (the after-retrieval gate) or "gate-pre";
            an existing Combiner is returned as it is.
        datastore_dir: the datastore (its lambda.json and mixing.safetensors are read when needed).
        combine: "mix" (λ-interpolation) or "spalm" (SPALM's gated memory; λ is then unused).
        skip_below: None, a number in [0, 1] or "tuned": skip the search where the before-retrieval
            gate predicts λ below it.
        temperature: T of p_kNN; None takes the tuned T, else 1.
        search: the current search settings (Retriever.describe plus "index"); when tuned values were
            fitted with others, the Combiner's `mismatch` says so.

    Raises:
        KNNLMError: a bad number, or tuned values that the datastore does not have.
    """
    if isinstance(lam, Combiner):
        return lam
    word, combine = str(lam).strip().lower(), str(combine).strip().lower()
    if combine not in COMBINE_KINDS:
        raise KNNLMError(f"--combine must be one of {', '.join(COMBINE_KINDS)}, not {combine!r}.")
    number = None if word in LAMBDA_WORDS else _parse_lambda(word)
    if combine == "spalm" and word != "0.25":  # the default is no choice; any other λ would be silently unused
        raise spalm_lambda_error(lam)
    skip_word = None if skip_below is None else str(skip_below).strip().lower()
    skip_number = None if skip_word in (None, "tuned") else _parse_skip(skip_word)
    if combine == "mix" and number is not None and skip_below is None:
        out = FixedLambda(number, pick_temperature(temperature, datastore_dir), f"--lambda {lam}")
        data = load_lambda(datastore_dir) if temperature is None and datastore_dir is not None else None
        if data is not None:  # T itself may be the tuned one (never tuned: no tuned value is used)
            out.mismatch = search_settings_note(data, search)
        return out
    data = load_lambda(datastore_dir) if datastore_dir is not None else None
    path = Path(str(datastore_dir)) / LAMBDA_FILE
    if data is None:
        asked, instead = ("--combine spalm", "pass --combine mix") if combine == "spalm" else \
            (f"--lambda {lam}", "pass a number, e.g. --lambda 0.25") if number is None else \
            (f"--skip-below {skip_below}", "leave out --skip-below")
        raise KNNLMError(f"Datastore {datastore_dir} was never tuned (no {LAMBDA_FILE}), which {asked} needs; "
                         f"run `knnlm tune-lambda` first, or {instead}.")
    loaded: dict = {}

    def tensors() -> dict[str, torch.Tensor]:  # read only once a gate is known to be recorded
        if not loaded:
            loaded.update(load_mixing_tensors(datastore_dir, data))
        return loaded
    when = f"tuned {data.get('created', '')}"
    if combine == "spalm":
        if skip_below is not None:
            raise KNNLMError("--skip-below works with λ mixing, not with --combine spalm; drop one of them.")
        entry = data.get("spalm")
        if not entry:
            raise KNNLMError(f"{path} has no SPALM gate (tuned with --no-spalm or by an older knnlm); run "
                             "`knnlm tune-lambda` with SPALM on, or use --combine mix.")
        gate = SpalmGate(int(entry["dim"]))
        gate.load_state_dict({name[len("spalm."):]: t for name, t in tensors().items() if name.startswith("spalm.")})
        out: Combiner = SpalmMix(gate.eval().requires_grad_(False), pick_temperature(temperature, datastore_dir),
                                 f"{path} (SPALM gate, {when})")
    else:
        skip = None
        if skip_below is not None:
            threshold = skip_number
            if skip_word == "tuned":
                threshold = (data.get("gate") or {}).get("skip_below")
                if threshold is None:
                    raise KNNLMError(f"{path} has no tuned skip threshold (tuned with --no-gate or --no-skip); run "
                                     "`knnlm tune-lambda` with the gate on, or pass a number, e.g. --skip-below 0.05.")
            skip = Skip(_gate(data, tensors, "pre", path), float(threshold))
        if number is not None:
            out = FixedLambda(number, pick_temperature(temperature, datastore_dir), f"--lambda {lam}", skip)
        elif word == "tuned":
            out = FixedLambda(float(data["lambda"]), pick_temperature(temperature, datastore_dir, data["temperature"]),
                              f"{path} (λ {data['lambda']:.4g}, {when})", skip, kind="tuned")
        elif word == "adaptive":
            ada = data.get("adaptive")
            if not ada:
                raise KNNLMError(f"{path} has no adaptive schedule (tuned with --no-adaptive); run `knnlm tune-lambda "
                                 "--adaptive` or pass --lambda tuned.")
            out = AdaptiveLambda(ada["edges"], ada["lambdas"],
                                 pick_temperature(temperature, datastore_dir, ada["temperature"]),
                                 f"{path} (adaptive, {len(ada['lambdas'])} bins, {when})", skip)
        else:
            after = word == "gate"
            gate = _gate(data, tensors, "post" if after else "pre", path)
            if temperature is not None and float(temperature) != float(data["gate"]["temperature"]):
                # Its features (p_kNN's entropy, argmax) and its λ were fitted at the tuned T.
                raise KNNLMError(f"--lambda {word} was trained at temperature {data['gate']['temperature']:.4g}; "
                                 "drop --temperature, or tune again.")
            out = GateLambda(gate, after, pick_temperature(temperature, datastore_dir, data["gate"]["temperature"]),
                             f"{path} ({word}, {when})", skip)
    out.mismatch = search_settings_note(data, search)
    return out


def _parse_skip(word: str) -> float:
    try:
        x = float(word)
    except ValueError:
        x = float("nan")
    if not 0.0 <= x <= 1.0:
        raise KNNLMError(f"--skip-below must be a number in [0, 1] or 'tuned', not {word!r}; pass e.g. --skip-below 0.05.")
    return x

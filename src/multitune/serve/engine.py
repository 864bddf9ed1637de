"""Serve many tasks through one API: a shared frozen base for every adapter method, a group of its own
for each fully fine-tuned task.

Requests are ``(task, input)`` pairs in any order. The engine groups them by model: every row of a task on
the shared base goes into one mixed forward (each row routed to its task), and the rows of a fully
fine-tuned task, which owns a copy of the base, go into that copy's forward. Results come back in request
order. Tasks are loaded and removed at run time without touching the others.

What a folder holds is found by :func:`find_adapters`: a bank of task folders (``BANK/TASK/adapter.json``,
what ``compare`` and ``train-multi`` write), a folder of run folders (``BANK/RUN/adapter/adapter.json``, what
``train --output BANK/RUN`` writes), one run folder, one adapter folder, or several of these. A task is named
after its folder (a run's adapter after its run folder), so what ``ls`` shows is what a request names.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from multitune.bank import MultiTaskModel, TaskSpec, pool
from multitune.config import task_name_from_folder
from multitune.data import Example
from multitune.encode import collate, encode_task, to_device
from multitune.errors import ConfigError
from multitune.health.profile import token_stats
from multitune.health.versions import current_adapter, task_root, version_of
from multitune.methods import get_method
from multitune.models import Base, load_base
from multitune.storage import CONFIG_FILE, load_adapter, read_adapter_config

Request = tuple[str, "str | Example"]
DEFAULT_MAX_LENGTH = 128  # tokens of a classification input, as TrainConfig.max_length defaults
EMBED_MAX_LENGTH = 256  # tokens of a text embedded by the bare base (all-MiniLM-L6-v2's max_seq_length)
RUN_CONFIG = "config.yaml"  # beside a run's adapter/ folder: the run's settings


@dataclass
class Classification:
    """One classified input: its label probabilities (in the task's label order) and whether its tokens were
    cut to the task's ``max_length`` (the model then saw only the first ``max_length`` tokens).

    With ``features=True`` (:meth:`Engine.classify_rows`), also what the drift monitor reads, taken from the
    forward and the encoding that served the row (no second forward): ``pooled`` (H,) float32, the pooled
    hidden state its head read (NaN for a row scored by its method, None when no row of the batch had a
    head), ``length`` (its tokens) and ``unknown_rate`` (the share of them that are the unknown token)."""

    probabilities: dict[str, float]
    truncated: bool = False
    pooled: torch.Tensor | None = None
    length: int = 0
    unknown_rate: float = 0.0


def adapter_of(path: str | Path) -> Path | None:
    """The adapter folder to load for ``path`` when it is one (``adapter.json``) or a run folder
    (``adapter/adapter.json``): its current version's (:func:`multitune.health.versions.current_adapter`)."""
    return current_adapter(path)


def task_name_of(path: str | Path) -> str:
    """The name of the task in a run or adapter folder given alone: the folder's, or for a run's ``adapter/``
    folder or a version's folder (``ROOT/versions/N``), its task root's (made a valid task name as ``train``
    makes its default: ``my.run`` -> ``my-run``)."""
    path = Path(path).resolve()
    if version_of(path) is not None:
        path = path.parent.parent
    return task_name_from_folder(path.parent if path.name == "adapter" and path.parent.name else path)


def _tasks_in(path: Path) -> list[tuple[str, Path]]:
    """(task name, adapter folder) of what ``path`` holds; names from the layout, not from adapter.json."""
    if (path / CONFIG_FILE).is_file():  # an adapter folder, a bank's task folder or a version's folder
        return [(task_name_of(path), adapter_of(path) or path)]
    children = sorted(c for c in path.iterdir() if not c.name.startswith(".") and c.is_dir())
    tasks = [(task_name_from_folder(child), adapter) for child in children if (adapter := adapter_of(child))]
    if len(tasks) == 1 and tasks[0][0] == "adapter" and (path / "adapter" / CONFIG_FILE).is_file():
        return [(task_name_of(path), tasks[0][1])]  # a run folder (a bank of one task named "adapter" alike)
    return tasks


def find_adapters(paths: str | Path | Iterable[str | Path]) -> dict[str, Path]:
    """Task name -> adapter folder for every task under ``paths`` (see the module docstring for the layouts).

    Hidden entries (``.x.tmp-*`` of an interrupted save, lock files) are never tasks; two tasks of one name
    from different folders are an error (which of them a request meant could not be told).
    """
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    found: dict[str, Path] = {}
    for path in map(Path, paths):
        if not path.is_dir():
            raise ConfigError(
                f"{path} is not a folder; give a bank folder (BANK/TASK/adapter.json), a folder of "
                "run folders, a run folder or an adapter folder"
            )
        tasks = _tasks_in(path)
        if not tasks:
            hint = f"; did you mean {path / 'bank'}?" if (path / "bank").is_dir() else ""
            raise ConfigError(
                f"{path} holds no adapter folders (TASK/{CONFIG_FILE} or RUN/adapter/{CONFIG_FILE}); "
                f"give a bank folder, a folder of run folders, a run folder or an adapter folder{hint}"
            )
        for name, adapter in tasks:
            other = found.get(name)
            if other is not None and other.resolve() != adapter.resolve():
                raise ConfigError(
                    f"two tasks are named '{name}': {other} and {adapter}; a task is named after its "
                    "folder, so rename one of the folders"
                )
            found.setdefault(name, adapter)
    return found


def trained_max_length(adapter: Path) -> int:
    """The ``max_length`` a run trained with (``RUN/config.yaml`` beside ``RUN/adapter``), else the default.

    The setting is read from the file's ``train:`` section (the layout ``train`` writes) or, failing that,
    from its top level (flat keys)."""
    adapter = Path(adapter)
    if version_of(adapter) is not None:  # ROOT/versions/N: the run's settings
        adapter = adapter.parent.parent / "adapter"
    config = adapter.parent / RUN_CONFIG
    if adapter.name != "adapter" or not config.is_file():
        return DEFAULT_MAX_LENGTH
    try:
        settings = yaml.safe_load(config.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{config} is not valid YAML ({type(error).__name__}); fix or remove it") from error
    settings = settings if isinstance(settings, dict) else {}
    train = settings.get("train")
    train = train if isinstance(train, dict) else {}
    value = train.get("max_length", settings.get("max_length"))
    if value is None:
        return DEFAULT_MAX_LENGTH
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(
            f"{config}: max_length must be a positive integer; fix the file or remove the setting"
        )
    return value


class Engine:
    """Tasks of every method behind one ``classify`` / ``generate``."""

    def __init__(self, base: Base) -> None:
        self.base = base
        self.shared = MultiTaskModel(base)
        self.groups: dict[str, MultiTaskModel] = {}  # fully fine-tuned task -> its own bank (model copy)
        # task -> what it was loaded from, as given: a task root (a run folder, a bank's task folder), an adapter
        # folder, or ROOT/versions/N (pinned); a reload without a path loads it again, so a task root gives its
        # current version (multitune.health.versions)
        self.sources: dict[str, str] = {}
        self.adapters: dict[str, Path] = {}  # task -> the adapter folder actually loaded (weights, profile)
        # bank tasks loaded only as the base component of stacked tasks (multitune.compose.stack): not served
        self.components: set[str] = set()
        self.max_lengths: dict[str, int] = {}  # task -> classification inputs are cut to this many tokens
        # Fast tokenizers must not be used from two threads at once (a server tokenizes requests while
        # its worker encodes a batch): every encoding here holds this lock.
        self.tokenizer_lock = threading.Lock()

    # ---- tasks -------------------------------------------------------------------------------------
    @classmethod
    def from_folder(
        cls,
        folder: str | Path | Iterable[str | Path],
        model: str | None = None,
        device: str | None = None,
        quantize: str | None = None,
    ) -> Engine:
        """Every task under ``folder`` (one path or several; the layouts of :func:`find_adapters`).

        Without ``model``, the base is the one the adapters record; adapters that record different bases
        are refused before anything loads (one engine serves one base). Without ``quantize``, the base is
        quantized as the adapters' runs had it (``base_quantize``, nf4/fp4/int8) or not at all.
        """
        given = [folder] if isinstance(folder, str | Path) else list(folder)  # read twice: a list
        adapters = find_adapters(given)
        metas = {name: read_adapter_config(path) for name, path in adapters.items()}
        bases: dict[str, list[str]] = {}
        for name, meta in metas.items():
            bases.setdefault(str(meta.get("base_model")), []).append(name)
        if model is None and len(bases) > 1:
            mixed = "; ".join(f"{base!r} ({', '.join(names)})" for base, names in sorted(bases.items()))
            raise ConfigError(
                f"the folders mix base models: {mixed}; one engine serves one base, so serve each "
                "base's tasks from their own folder (one server per base)"
            )
        recorded = {str(m["base_quantize"]) for m in metas.values() if m.get("base_quantize")}
        if quantize is None and len(recorded) > 1:
            raise ConfigError(
                f"the adapters were trained over bases quantized differently ({', '.join(sorted(recorded))}); "
                "pick one with --quantize"
            )
        quantize = quantize or next(iter(recorded), None)
        engine = cls(load_base(model or next(iter(bases)), device=device, quantize=quantize))
        for name, adapter in adapters.items():
            engine.load(_source_of(adapter, given), name)
        return engine

    @property
    def tasks(self) -> dict[str, TaskSpec]:
        shared = {name: spec for name, spec in self.shared.tasks.items() if name not in self.components}
        return {**shared, **{name: bank.tasks[name] for name, bank in self.groups.items()}}

    def load(self, folder: str | Path, name: str | None = None) -> TaskSpec:
        """Add the task saved in an adapter folder or a run folder (``RUN/adapter``), named ``name`` or after
        its folder (see :func:`task_name_of`); a fully fine-tuned task gets a fresh copy of the base. A task root
        loads its current version (``ROOT/versions/N`` pins version N), and ``sources`` keeps ``folder`` as given."""
        source = str(folder)
        folder = adapter_of(folder) or Path(
            folder
        )  # not a folder of either kind: read_adapter_config says so
        meta = read_adapter_config(folder)
        task = name or task_name_of(folder)
        if task in self.tasks:
            raise ConfigError(
                f"task '{task}' is already served; remove it first or load it under another name"
            )
        if task in self.components:  # served itself now, if it is the same adapter its stacked tasks stand on
            spec = self._serve_component(task, folder)
        elif get_method(meta["task"]["method"]).changes_base:
            bank = MultiTaskModel(self._base_copy())
            spec = load_adapter(bank, folder, task)
            self.groups[task] = bank
        else:
            before = set(self.shared.tasks)
            spec = load_adapter(self.shared, folder, task)
            self.components |= set(self.shared.tasks) - before - {task}  # what a stacked task brought in
        self.sources[task], self.adapters[task] = source, folder
        self.max_lengths[task] = trained_max_length(folder)
        return spec

    def _serve_component(self, task: str, folder: Path) -> TaskSpec:
        from multitune.compose.stack import digest

        loaded = self.shared.loaded_from.get(task)
        if loaded is None or loaded[1] != digest(folder):
            raise ConfigError(
                f"task '{task}' is already in the engine as the base of a stacked task, with other weights than "
                f"{folder}; load this one under another name"
            )
        self.components.discard(task)
        return self.shared.tasks[task]

    def _prune_components(self) -> None:
        """Take out the components no served task stands on any more (the top of a stack first)."""
        while True:
            used = {m for t in self.shared.tasks for m in self.shared.routing.chain(t) if m != t}
            idle = [c for c in self.components if c not in used]
            if not idle:
                return
            for component in idle:
                self.shared.remove_task(component)
                self.components.discard(component)

    def _base_copy(self) -> Base:
        try:
            return load_base(self.base.source, device=str(self.base.device))
        except ConfigError as error:
            raise ConfigError(
                f"a fully fine-tuned task needs its own copy of the base, and {self.base.source!r} "
                f"cannot be loaded again ({error}); serve from a model folder, file or short name"
            ) from error

    def remove(self, task: str) -> None:
        if task in self.groups:
            del self.groups[task]
        elif task in self.shared.tasks and task not in self.components:
            self.components.add(task)  # no longer served; kept while a stacked task stands on it
            self._prune_components()
        else:
            raise ConfigError(f"unknown task '{task}'; served tasks: {', '.join(self.tasks) or 'none'}")
        self.sources.pop(task, None)
        self.adapters.pop(task, None)
        self.max_lengths.pop(task, None)

    def bank_of(self, task: str) -> MultiTaskModel:
        if task in self.groups:
            return self.groups[task]
        if task in self.shared.tasks and task not in self.components:
            return self.shared
        raise ConfigError(f"unknown task '{task}'; served tasks: {', '.join(self.tasks) or 'none'}")

    # ---- requests ----------------------------------------------------------------------------------
    def _grouped(self, requests: Sequence[Request], kind: str) -> dict[int, list[int]]:
        """Request indices by bank (keyed by id), checking every task exists and is of ``kind``."""
        groups: dict[int, list[int]] = {}
        for i, (task, _) in enumerate(requests):
            bank = self.bank_of(task)
            if bank.tasks[task].kind != kind:
                raise ConfigError(f"task '{task}' is a {bank.tasks[task].kind} task, not {kind}")
            groups.setdefault(id(bank), []).append(i)
        return groups

    def features(
        self,
        bank: MultiTaskModel,
        requests: Sequence[Request],
        rows: list[int],
        max_length: int | None,
        with_target: bool,
    ) -> tuple[list[dict[str, Any]], list[int]]:
        """Features and slots of the given requests, in their order (each task's render hook applied);
        ``max_length`` None: each task's own (what it was trained with)."""
        features: list[dict[str, Any]] = [{}] * len(rows)
        by_task: dict[str, list[int]] = {}
        for position, i in enumerate(rows):
            by_task.setdefault(requests[i][0], []).append(position)
        for task, positions in by_task.items():
            examples = [_example(requests[rows[p]][1]) for p in positions]
            length = max_length or self.max_lengths.get(task, DEFAULT_MAX_LENGTH)
            with self.tokenizer_lock:
                encoded = encode_task(bank, task, examples, length, with_target)
            for p, feature in zip(positions, encoded, strict=True):
                features[p] = feature
        slots = [bank.slots.index(requests[i][0]) for i in rows]
        return features, slots

    @torch.no_grad()
    def classify_rows(
        self, requests: Sequence[Request], max_length: int | None = None, features: bool = False
    ) -> list[Classification]:
        """Each (task, text) classified, with whether its input was cut: one forward per model, rows of many
        tasks mixed. Inputs are cut to ``max_length`` tokens, by default each task's training ``max_length``
        (``RUN/config.yaml``; 128 when the folder does not record it), so a task sees what it was trained on.

        ``features``: each row also carries its pooled vector, token length and unknown-token rate (see
        :class:`Classification`), from this same forward and encoding; off, nothing extra is kept or computed."""
        out: list[Classification] = [Classification({})] * len(requests)
        for rows in self._grouped(requests, "classification").values():
            bank = self.bank_of(requests[rows[0]][0])
            bank.eval()
            encoded, slots = self.features(bank, requests, rows, max_length, True)
            batch = to_device(collate(encoded, bank.base.tokenizer.pad_token_id, slots), bank.base.device)
            pooled_out: list[torch.Tensor | None] | None = [] if features else None
            logits = bank.classify(
                batch["input_ids"], batch["attention_mask"], batch["task_ids"], pooled_out=pooled_out
            )
            pooled = pooled_out[0] if pooled_out else None
            if features:  # counted as the reference profile counts them, so that their tests compare alike
                lengths, unknown = token_stats(
                    batch["input_ids"], batch["attention_mask"], bank.base.tokenizer.unk_token_id
                )
            for row, i in enumerate(rows):
                labels = bank.tasks[requests[i][0]].labels
                probs = torch.softmax(logits[row, : len(labels)].float(), dim=-1).tolist()
                result = Classification(
                    dict(zip(labels, probs, strict=True)), bool(encoded[row].get("truncated"))
                )
                if features:
                    result.pooled = None if pooled is None else pooled[row]
                    result.length, result.unknown_rate = lengths[row], unknown[row]
                out[i] = result
        return out

    @torch.no_grad()
    def embed_rows(self, requests: Sequence[tuple[str | None, str]]) -> list[tuple[list[float], int]]:
        """Each (task, text)'s sentence embedding and its token count: the mean of the last hidden states over
        the text's tokens, L2-normalised (sentence-transformers' recipe for MiniLM: mean pooling, then
        ``Normalize``), through the task's adapter, or of the bare base for task None. The text is tokenised
        as a classification input and cut to the task's max_length (the base's: ``EMBED_MAX_LENGTH``). One
        forward per bank for the task rows, rows of many tasks mixed; one with every adapter off for the
        base rows."""
        out: list[tuple[list[float], int]] = [([], 0)] * len(requests)
        groups: dict[tuple[int, bool], tuple[MultiTaskModel, list[int]]] = {}
        for i, (task, _) in enumerate(requests):
            bank = self.shared if task is None else self.bank_of(task)
            groups.setdefault((id(bank), task is None), (bank, []))[1].append(i)
        for (_, bare), (bank, rows) in groups.items():
            bank.eval()
            tokenizer = bank.base.tokenizer
            encoded = []
            with self.tokenizer_lock:
                for i in rows:
                    task, text = requests[i]
                    length = (
                        EMBED_MAX_LENGTH if task is None else self.max_lengths.get(task, DEFAULT_MAX_LENGTH)
                    )
                    encoded.append(
                        {"input_ids": list(tokenizer(text, truncation=True, max_length=length).input_ids)}
                    )
            slots = [0 if requests[i][0] is None else bank.slots.index(str(requests[i][0])) for i in rows]
            batch = to_device(collate(encoded, tokenizer.pad_token_id, slots), bank.base.device)
            with bank.disabled() if bare else contextlib.nullcontext():
                hidden = bank.hidden_states(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
            pooled = pool(hidden.float(), batch["attention_mask"], "mean", bank.base.arch)
            vectors = torch.nn.functional.normalize(pooled, p=2, dim=-1).cpu()
            for row, i in enumerate(rows):
                out[i] = (vectors[row].tolist(), len(encoded[row]["input_ids"]))
        return out

    def classify(self, requests: Sequence[Request], max_length: int | None = None) -> list[dict[str, float]]:
        """Label probabilities of each (task, text) (see :meth:`classify_rows`)."""
        return [row.probabilities for row in self.classify_rows(requests, max_length)]

    @torch.no_grad()
    def generate(
        self,
        requests: Sequence[Request],
        max_new_tokens: int = 64,
        max_length: int = 128,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Completions of each (task, prompt): one ``generate`` per model, rows of many tasks mixed."""
        out = [""] * len(requests)
        generate_kwargs.setdefault("do_sample", False)
        for rows in self._grouped(requests, "generation").values():
            bank = self.bank_of(requests[rows[0]][0])
            bank.eval()
            tokenizer = bank.base.tokenizer
            features, slots = self.features(bank, requests, rows, max_length, False)
            side = "left" if bank.base.arch == "decoder" else "right"
            batch = to_device(
                collate(features, tokenizer.pad_token_id, slots, padding_side=side), bank.base.device
            )
            ids = bank.generate(
                batch["input_ids"],
                batch["attention_mask"],
                batch["task_ids"],
                max_new_tokens=max_new_tokens,
                **generate_kwargs,
            )
            for row, i in enumerate(rows):
                out[i] = tokenizer.decode(ids[row], skip_special_tokens=True).strip()
        return out


def _source_of(adapter: Path, given: Sequence[str | Path]) -> Path:
    """What a task found by :func:`find_adapters` is loaded from: its task root, which a reload resolves again
    (its current version then), unless a path given names its version folder (``ROOT/versions/N`` or
    ``ROOT/versions``): that version is pinned."""
    if version_of(adapter) is not None:
        pins = {adapter.resolve(), adapter.parent.resolve()}
        if any(Path(path).resolve() in pins for path in given):
            return adapter
    return task_root(adapter)


def _example(item: str | Example) -> Example:
    return item if isinstance(item, Example) else Example(text=item)


def in_passing_thread(load: Callable[[], Any]) -> Any:
    """``load()`` run in a thread that ends before this returns: load the engine a scheduler will serve.

    libgomp (torch's OpenMP on Linux) keeps a pool of threads for every thread that ran a parallel region, and
    when the pools hold more threads than the machine has cores it spins only briefly before sleeping between
    regions. The scheduler runs every forward in its worker thread; had the engine been loaded in the main
    thread, the main thread's idle pool would count too, and each of the thousands of small parallel regions of
    a decode step would pay a wake-up: measured on 2 cores, 280 ms per step of 16 rows instead of 135 ms.
    A thread that ends frees its pool, which leaves the worker's the only one.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="multitune-load") as pool:
        return pool.submit(load).result()

"""The recipe: one YAML file that describes a study (models x pipelines x tasks x measurements).

    name: quickstart
    models: [smollm2-135m]
    pipelines:
      rtn-int8: [{method: rtn, bits: 8}]      # ordered steps, each a registered method and its config
    tasks: [text-ppl, text-cloze, arith, fidelity]
    limit: 40                                 # or per task: {text-ppl: 40, arc_easy: 200} (a task not named: all)
    bench: {prefill: [128, 512], decode_tokens: 64}
    decoding: {drafts: ["layers:10"], tau: 2.0}  # optional: generation tasks by speculative decoding (HSD);
                                              # `pipelines: [a, b]` limits it to those pipelines
    threads: 2                                # optional: torch threads per cell (--runner ray reserves as many CPUs)
    study: ablation                           # optional: a generated study: ablation or transfer (generated.py)
    devices: [rpi5, apple-m2]                 # optional: the devices the report projects onto (`budgetlm devices`)
    latent: {tasks: [arc_easy, text-cloze], items: 64, perplexity: 30}  # optional: t-SNE of final hidden states
    runtime: {llama.cpp: [rtn-int8]}          # optional: also run these pipelines in llama.cpp (runtime.py)

Every level rejects unknown keys. Steps are validated against the method registry and stored with all
defaults filled in, so the resolved recipe says exactly what runs. A pipeline named `baseline` with no
steps is always present: it is the reference for recovery % and for KL / fidelity tasks.
A pipeline that fine-tunes on a task the study evaluates must not be scored on items it trained on: training on
boolq (its train fold) with `boolq` among the tasks is refused, `boolq:eval-fold` is the task to evaluate.
Errors are one line: "recipe x.yaml: pipelines.int8[0].bits: Input should be a valid integer".
"""

from __future__ import annotations

import itertools
import re
import types
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from budgetlm.errors import ConfigError, UnknownNameError, suggest
from budgetlm.experiments.latent import LatentSettings, check_latent
from budgetlm.experiments.runtime import add_siblings, strip_siblings
from budgetlm.utils import YamlLoader

BASELINE = "baseline"
OFFLINE_SUITE = ["text-ppl", "text-cloze", "arith", "fidelity"]
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_PIPELINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+@-]*$")  # '@': transfer studies' `<pipeline>@train-<task>`


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BenchSettings(_Strict):
    enabled: bool = True
    prefill: list[int] = Field(default_factory=lambda: [128, 512])
    decode_tokens: int = Field(64, ge=1)
    repeats: int = Field(3, ge=1)
    warmup: int = Field(1, ge=0)


class DecodeSettings(_Strict):
    """Speculative decoding for the study's generation tasks (decode/): drafts cheapest first (model names, folders,
    GGUF files, layers:K: each cell's own model cut to K layers, copy:METHOD[:key=value...]: each cell's own model
    copied and compressed), an entropy gate per draft, the mode."""

    drafts: list[str] = Field(min_length=1)
    tau: float | str | None = None  # one value for every draft, "a,b" one per draft, "inf": no gate
    mode: str = "exact"
    max_draft: int = Field(8, ge=1)
    draft_window: int = Field(0, ge=0)  # > 0: drafts attend to 4 sinks + the last draft_window positions (MagicDec)
    draft_kv: str = "auto"  # the drafts' key/value caches: auto (bf16 in exact mode on the lean runtime), fp32, bf16
    pipelines: list[str] | None = None  # the pipelines decoded so (absent: all); the others decode plainly

    def applies(self, pipeline: str) -> bool:
        return self.pipelines is None or pipeline in self.pipelines

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        from budgetlm.decode.speculative import MODES

        return _one_of(v, MODES, f"'{v}' is not a decoding mode")

    def resolved(self) -> dict:
        """The settings as decode.generate.build takes them, checked (one-line errors)."""
        from budgetlm.decode.drafts import parse_specs, parse_taus

        specs = parse_specs(",".join(self.drafts))
        tau = None if self.tau is None else str(self.tau)
        parse_taus(tau, len(specs))
        from budgetlm.decode.generate import check_settings

        check_settings(1, self.mode, self.max_draft, 0.0, 1.0, self.draft_window, self.draft_kv)
        out = {"drafts": specs, "tau": tau, "mode": self.mode, "max_draft": self.max_draft}
        if self.draft_window:  # absent where default: cell ids unchanged
            out["draft_window"] = self.draft_window
        if self.draft_kv != "auto":
            out["draft_kv"] = self.draft_kv
        return out


class StudySettings(_Strict):
    """A generated study (experiments/generated.py): `study: ablation` or `{kind: transfer, pipeline: P, ...}`."""

    kind: str
    pipeline: str | None = None  # the pipeline it is built from (absent: the only one besides the baseline)
    train_tasks: list[str] | None = None  # transfer: the tasks to adapt on (absent: the recipe's tasks that train)
    roles: dict[str, str] = Field(default_factory=dict)  # filled in on resolution: {generated pipeline: its role}

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        from budgetlm.experiments.generated import KINDS

        return _one_of(v, KINDS, f"unknown study kind '{v}'")


class Recipe(_Strict):
    name: str = "study"
    models: list[str] = Field(default_factory=lambda: ["smollm2-135m"], min_length=1)
    pipelines: dict[str, list[dict[str, Any] | str]] = Field(default_factory=dict)
    tasks: list[str] = Field(default_factory=lambda: list(OFFLINE_SUITE))
    limit: int | dict[str, int | None] | None = None  # items per task: one number, or {task: number} (absent: all)
    seed: int = 0
    data_dir: str | None = None
    bench: BenchSettings = Field(default_factory=BenchSettings)
    eval_batch_size: int | None = Field(None, ge=1)
    decoding: DecodeSettings | None = None  # generation tasks by speculative decoding (absent: plain)
    threads: int | None = Field(None, ge=1)  # torch threads per cell, the CPUs a Ray task reserves (absent: default)
    study: StudySettings | None = None  # a generated study: ablation or transfer (absent: the pipelines as given)
    devices: list[str] | None = None  # the report's device projections (absent: report/projection.py's defaults)
    runtime: dict[str, list[str]] | None = None  # {llama.cpp: [pipeline, ...]}: `<p>@llama.cpp` cells (runtime.py)

    @field_validator("study", mode="before")
    @classmethod
    def _study(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v

    latent: LatentSettings | None = None  # t-SNE of final hidden states per cell (experiments/latent.py; absent: off)

    @field_validator("limit", mode="before")
    @classmethod
    def _limit(cls, v: Any) -> Any:
        """One positive number for every task, or a mapping of task names to positive numbers (or null: all)."""
        if isinstance(v, dict):
            for task, n in v.items():
                if n is not None:
                    _positive(n, f"{task}: ")
            return v
        return v if v is None else _positive(v, "")


def _one_of(v: str, choices, unknown: str) -> str:
    if v not in choices:
        raise ValueError(f"{unknown}{suggest(v, list(choices))}; use one of: {', '.join(choices)}")
    return v


def _positive(n: Any, where: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"{where}Input should be a valid integer (or a mapping of task names to integers)")
    if n < 1:
        raise ValueError(f"{where}Input should be greater than or equal to 1")
    return n


# ---------------------------------------------------------------------------------------------- loading


def bundled_recipe(name: str = "quickstart") -> Path:
    return Path(str(resources.files("budgetlm") / "recipes" / f"{name}.yaml"))


def load_recipe(path: str | Path | None = None) -> Recipe:
    """Read and validate a recipe file; None reads the bundled quickstart study."""
    path = bundled_recipe() if path is None else Path(path)
    if not path.is_file() and path.suffix == "" and bundled_recipe(path.name).is_file() and len(path.parts) == 1:
        path = bundled_recipe(path.name)  # a bundled recipe by name: `budgetlm run quant_suite`
    origin = f"recipe {path}"
    if not path.is_file():
        bundled = ", ".join(sorted(p.stem for p in bundled_recipe().parent.glob("*.yaml")))
        raise ConfigError(
            f"{origin}: no such file; pass the path of a recipe YAML file or a bundled recipe name ({bundled})"
        )
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - safe loader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{origin}: invalid YAML{where}: {exc.problem or exc.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{origin}: invalid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"{origin}: the file is empty; see the bundled quickstart.yaml for an example")
    return parse_recipe(data, origin)


def parse_recipe(data: Any, origin: str = "recipe") -> Recipe:
    """Validate a recipe given as a mapping; returns it resolved (steps with defaults, baseline added)."""
    if isinstance(data, Recipe):
        data = data.model_dump()
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of keys (models, pipelines, tasks, ...)")
    if isinstance(data.get("pipelines"), dict):  # `baseline:` with nothing after it means no steps
        data = {**data, "pipelines": {k: [] if v is None else v for k, v in data["pipelines"].items()}}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {_describe(exc, Recipe)}") from None
    return _resolve(recipe, origin)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------------------------------------- checks


def _resolve(recipe: Recipe, origin: str) -> Recipe:
    if not _SAFE_NAME.match(recipe.name):
        raise ConfigError(
            f"{origin}: name '{recipe.name}' must be letters, digits, '-', '_' or '.' (it names the run folder)"
        )
    models = [_check_model(m, i, origin) for i, m in enumerate(recipe.models)]
    for i, model in enumerate(models):
        fix = "remove {eval} from tasks or use a model not trained on {train}"
        _check_contamination(_recorded_training(model), recipe.tasks, f"{origin}: models[{i}] (its provenance)", fix)
    _no_duplicates(models, "models", origin)
    _no_duplicates(recipe.tasks, "tasks", origin)
    for i, task in enumerate(recipe.tasks):
        _check_task(task, f"tasks[{i}]", origin)
    if recipe.decoding is not None:
        try:
            recipe.decoding.resolved()
        except ConfigError as exc:
            raise ConfigError(f"{origin}: decoding: {exc}") from None
    if recipe.latent is not None:
        check_latent(recipe.latent, recipe.tasks, origin)
    if isinstance(recipe.limit, dict):
        for task in recipe.limit:
            if task not in recipe.tasks:
                raise ConfigError(
                    f"{origin}: limit.{task}: '{task}' is not among the recipe's tasks{suggest(task, recipe.tasks)}"
                )
    if not recipe.tasks and not recipe.bench.enabled:
        raise ConfigError(f"{origin}: nothing to measure: tasks is empty and bench.enabled is false")
    pipelines: dict[str, list[dict]] = {BASELINE: []}
    expanded: dict[str, list] = {}
    for name, steps in recipe.pipelines.items():
        for full, combo in _expand(name, steps, origin).items():
            if full in expanded or full in recipe.pipelines and full != name:
                raise ConfigError(f"{origin}: pipelines.{name}: its settings' product names '{full}' twice; rename it")
            expanded[full] = combo
    for name, steps in expanded.items():
        if not _PIPELINE_NAME.match(name):
            raise ConfigError(f"{origin}: pipelines.{name}: a pipeline name must be letters, digits, '-', '_' or '.'")
        if name == BASELINE and steps:
            raise ConfigError(
                f"{origin}: pipelines.{BASELINE} must be empty ([]): it is the unmodified model every other "
                "pipeline is compared with; give your pipeline another name"
            )
        pipelines[name] = [_resolve_step(step, f"pipelines.{name}[{i}]", origin) for i, step in enumerate(steps)]
    pipelines, study = strip_siblings(recipe.runtime, pipelines, origin), recipe.study
    if study is not None:
        from budgetlm.experiments.generated import expand

        pipelines, study = expand(study, pipelines, recipe.tasks, origin, partial(_resolve_step, origin=origin))
    runtimes, pipelines = add_siblings(recipe.runtime, pipelines, recipe.decoding, origin)
    _check_devices(recipe.devices, origin)
    for i, name in enumerate(recipe.decoding.pipelines or [] if recipe.decoding else []):
        if name not in pipelines:
            raise ConfigError(
                f"{origin}: decoding.pipelines[{i}]: no pipeline '{name}'{suggest(name, list(pipelines))}; "
                f"pipelines: {', '.join(pipelines)}"
            )
    data_dir = str(Path(recipe.data_dir).expanduser().resolve()) if recipe.data_dir else None
    if data_dir is not None and not Path(data_dir).is_dir():
        what = "is a file, not a folder" if Path(data_dir).exists() else "does not exist"
        raise ConfigError(f"{origin}: data_dir {recipe.data_dir} {what}; give the folder holding <task>/<split>.jsonl")
    for name, steps in pipelines.items():
        fix = "remove {eval} from tasks or train this pipeline on other data"
        _check_contamination(steps, recipe.tasks, f"{origin}: pipelines.{name}", fix)
    update = {"models": models, "pipelines": pipelines, "data_dir": data_dir, "study": study, "runtime": runtimes}
    return recipe.model_copy(update=update)


def _check_devices(names: list[str] | None, origin: str) -> None:
    """Every device the recipe names is a profile of hardware/devices.py (close names suggested)."""
    if names is None:
        return
    from budgetlm.errors import unknown
    from budgetlm.hardware.devices import load_devices

    if not names:
        raise ConfigError(f"{origin}: devices: an empty list; name devices from `budgetlm devices` or remove the key")
    profiles = load_devices()
    _no_duplicates(names, "devices", origin)
    for i, name in enumerate(names):
        if name not in profiles:
            raise UnknownNameError(f"{origin}: devices[{i}]: {unknown('device', name, profiles)}") from None


def _takes_list(annotation: Any) -> bool:
    """Whether a config field's type admits a list (its lists are values, not a product to expand)."""
    if annotation is Any or annotation in (list, tuple, set, frozenset):
        return True
    origin = get_origin(annotation)
    if origin in (list, tuple, set, frozenset):
        return True
    if origin in (Union, types.UnionType, Annotated):
        return any(_takes_list(a) for a in get_args(annotation))
    return False


def _label(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value)).strip("-") or "x"


def _expand(name: str, steps: list, origin: str) -> dict[str, list]:
    """A pipeline whose steps give a list for a single-valued setting (`bits: [2, 3, 4]`) stands for the product of
    those lists: one pipeline per combination, named `<name>.<key>-<value>...` in the lists' order. Lists of settings
    that take lists (targets, ignore) are values, not products."""
    from budgetlm.methods.base import methods

    axes = []  # (step index, key, values)
    for i, step in enumerate(steps if isinstance(steps, list) else []):
        if not isinstance(step, dict):
            continue
        try:
            fields = methods.get(step.get("method")).model_fields if isinstance(step.get("method"), str) else {}
        except UnknownNameError:
            fields = {}  # _resolve_step names the unknown method
        for key, value in step.items():
            if key == "method" or not isinstance(value, list) or key not in fields:
                continue
            if _takes_list(fields[key].annotation):
                continue
            if not value:
                raise ConfigError(
                    f"{origin}: pipelines.{name}[{i}].{key}: an empty list; give one value or a list of values to try"
                )
            axes.append((i, key, value))
    if not axes:
        return {name: steps}
    out: dict[str, list] = {}
    for combo in itertools.product(*(values for _, _, values in axes)):
        new = [dict(step) if isinstance(step, dict) else step for step in steps]
        label = []
        for (i, key, _), value in zip(axes, combo):
            new[i][key] = value
            label.append(f"{key}-{_label(value)}")
        out[".".join([name, *label])] = new
    return out


def _resolve_step(step: dict | str, where: str, origin: str) -> dict:
    """{"method": name, **config} -> the same with every default filled in by the method's config class."""
    from budgetlm.methods.base import methods

    if isinstance(step, str):
        step = {"method": step}
    cfg = dict(step)
    name = cfg.pop("method", None)
    if not isinstance(name, str):
        raise ConfigError(
            f"{origin}: {where}: a step needs a 'method' key naming a registered method (see `budgetlm methods`)"
        )
    try:
        config_class = methods.get(name)
    except UnknownNameError as exc:
        raise UnknownNameError(f"{origin}: {where}.method: {exc}") from None
    try:
        config = config_class.model_validate(cfg)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {_describe(exc, config_class, where)} (method '{name}')") from None
    return {"method": name, **config.model_dump(mode="json")}


def _check_task(name: str, where: str, origin: str) -> None:
    from budgetlm.data.tasks.base import tasks

    if name not in tasks:  # membership only: resolving a lazy task would import its dependencies
        try:
            tasks.get(name)
        except UnknownNameError as exc:
            raise UnknownNameError(f"{origin}: {where}: {exc}") from None


def _check_contamination(record: list, tasks: list[str], where: str, fix: str) -> None:
    """Training recorded in steps or a provenance on a study task's items, or on data made from them, is refused
    (data/tasks/contamination.py)."""
    from budgetlm.data.tasks import contamination

    contamination.check(contamination.trained_on(record), tasks, where, fix)


def _recorded_training(model: str) -> list:
    """What a model folder records of its making (a budgetlm folder's provenance.json, an adapter folder's record),
    read as JSON without loading the model; [] for bundled names, files, and records that do not parse (loading
    the model reports those)."""
    import json

    from budgetlm.models.handle import PROVENANCE
    from budgetlm.models.sources import ADAPTER_RECORD

    found = []
    for name in (PROVENANCE, ADAPTER_RECORD):
        path = Path(model) / name
        if path.is_file():
            try:
                found.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue
    return found


def _check_model(spec: str, i: int, origin: str) -> str:
    from budgetlm.models.sources import BUNDLED

    if spec in BUNDLED:
        return spec
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(
            f"{origin}: models[{i}]: '{spec}' is neither a bundled model nor an existing path{suggest(spec, BUNDLED)}; "
            f"bundled: {', '.join(BUNDLED)}"
        )
    return str(path.resolve())


def _no_duplicates(values: list[str], key: str, origin: str) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise ConfigError(f"{origin}: {key}: '{v}' is listed twice")
        seen.add(v)


# ---------------------------------------------------------------------------------------------- errors


def _describe(exc: ValidationError, root: type[BaseModel], prefix: str = "") -> str:
    """The first validation error as 'key.path: problem', naming the allowed keys for an unknown one."""
    errors = exc.errors()
    err = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        allowed = _allowed_keys(root, err["loc"][:-1])
        parent = _join(prefix, _format_loc(err["loc"][:-1]))
        where = f"{parent}: " if parent else ""
        return f"{where}unknown key '{key}'{suggest(key, allowed)} (allowed: {', '.join(allowed)}){more}"
    loc = _join(prefix, _format_loc(err["loc"]))
    if any(part in _UNION_TAGS for part in err["loc"]):  # a pipeline step that is neither a mapping nor a name
        return f"{loc}: a step is a mapping like {{method: rtn, bits: 8}} or a method name, not {err['input']!r}"
    return f"{loc or 'value'}: {err['msg'].removeprefix('Value error, ')}{more}"


def _join(prefix: str, loc: str) -> str:
    if not prefix or not loc:
        return prefix or loc
    return prefix + loc if loc.startswith("[") else f"{prefix}.{loc}"


_UNION_TAGS = ("dict[str,any]", "str")  # the union branch names pydantic puts in a step's error location


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Walk the location through nested models to list the fields allowed where the unknown key sits."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if get_origin(annotation) in (Union, types.UnionType):  # an optional section: `study: StudySettings | None`
            models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
            annotation = models[0] if models else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return list(model.model_fields)


class _UniqueKeyLoader(YamlLoader):
    """A safe loader (no base-60 numbers: `pattern: 2:4` stays "2:4") that rejects a key given twice in one mapping
    (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

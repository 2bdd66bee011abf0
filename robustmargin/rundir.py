"""The run directory: every path and file format of a run, and `Run`, the one view of a run that stages use.

A run is either trained here (config.toml with [data], [model], [train]; metrics.csv) or a user's model
(config.toml with an [external] table: the model SPEC, the SHA-256 of its weights and of its data). A `Run`
serves both the same way: its splits and their data, its checkpoints, a model for each, and what applies
(training history, homogeneity, a traceable Lipschitz chain). No stage needs to know which kind it has.

Checkpoints are known by their content: the SHA-256 of the file. Attack parts are keyed by it, merged
results and analysis outputs record it, and a result whose hash differs from the file now on disk is stale.

    config.toml, metrics.csv, state.pt
    checkpoints/index.csv              name, epoch, log10_loss, threshold_log10, file, sha256
    checkpoints/*.pt
    robustness/parts/CKPT/SPLIT/ATTACK-KEY/batch-START-SIZE.csv   the immutable record of finished batches
    robustness/requests/ID.json        a settings set and the (checkpoint, split) pairs asked of it
    robustness/views/ID-DIGEST/        one merged view: distances, curves, costs, points .csv, settings.json
    robustness/settings/ID  -> ../views/ID-DIGEST     the settings set's current view
    robustness/current      -> settings/ID            the set the last attack command used
    robustness/distances.csv -> current/distances.csv (and the other view files)
    robustness/certified.csv, tables/*, tables/provenance.json, figures/*, report.html

A view is written whole into a new folder, then linked into place by one atomic rename of a symbolic link,
so after a kill at any point a run reads as it was before or as it is after, never a mix.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from robustmargin.errors import UserError
from robustmargin.fileio import atomic_write, atomic_write_csv, atomic_write_text, fsync_path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CONFIG, METRICS, STATE = "config.toml", "metrics.csv", "state.pt"
INDEX = Path("checkpoints") / "index.csv"
INDEX_COLUMNS = ["name", "epoch", "log10_loss", "threshold_log10", "file"]
ROBUSTNESS, TABLES, FIGURES, REPORT = Path("robustness"), Path("tables"), Path("figures"), "report.html"
PROVENANCE = TABLES / "provenance.json"
NOTES = TABLES / "notes.txt"
SETTINGS_FILE = "settings.json"
VIEW_FILES = ("distances.csv", "curves.csv", "costs.csv", "points.csv", SETTINGS_FILE)
USER_CHECKPOINT = "model"      # the one checkpoint of a user's model run
LIVE_DATA = "data.npz"         # the data handed to `evaluate`
PART_COLUMNS = ("index", "label", "correct", "distance", "seconds", "forwards", "backwards")
DISTANCE_COLUMNS = ("checkpoint", "split", "index", "label", "correct", "attack", "distance")
SPLITS = ("train", "test")


# ----------------------------------------------------------------------------- reading files

def read_csv(path: Path, columns: tuple[str, ...] | list[str] = (), *, required: bool = True,
             fix: str = "") -> pd.DataFrame | None:
    """A CSV with the given columns; a missing (when required), unreadable or incomplete file is one line
    naming the file and, with `fix`, what to do."""
    tail = f"; {fix}" if fix else ""
    if not path.is_file():
        if required:
            raise UserError(f"missing {path}{tail}")
        return None
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise UserError(f"{path} is damaged: not a readable CSV ({type(err).__name__}){tail}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"{path} is damaged: it lacks columns {', '.join(missing)}{tail}")
    return frame


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None when the file is missing or damaged (its writer rebuilds it)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def json_text(value: Any) -> str:
    """JSON with NaN and infinities as null: they are not JSON, and NaN is never an identity."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(value), indent=1, allow_nan=False) + "\n"


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (computed once per version of the file in a process)."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


# ----------------------------------------------------------------------------- a user's model: its record

@dataclass(frozen=True)
class ModelRecord:
    """The [external] table of a user's model run."""

    model: str            # SPEC ("file.py:factory" or "package.module:factory"), or "<live Class>"
    weights_sha256: str   # of the --weights file; without one, and for a live module, of the module's state
    data: str             # mnist5k | mnist | cifar10, or an .npz path (relative to the run directory if inside)
    data_sha256: str = ""  # .npz only
    data_config: Any = None  # DataConfig, named datasets only

    @property
    def live(self) -> bool:
        return self.model.startswith("<")


def portable_path(path: str | Path, run_dir: Path) -> str:
    """A path as a run directory stores it: relative to the run when it lies inside, else as written."""
    try:
        return str(Path(path).resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(path)


def stored_path(text: str, run_dir: Path) -> Path:
    """The file a stored path names: inside the run directory when it is there, else as written."""
    inside = run_dir / text
    return inside if not Path(text).is_absolute() and inside.exists() else Path(text)


def read_model_record(run_dir: Path) -> ModelRecord | None:
    from robustmargin.config import DataConfig

    path = run_dir / CONFIG
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None  # load_config reports it
    table = raw.get("external")
    if not isinstance(table, dict):
        return None
    try:
        return ModelRecord(**table, data_config=DataConfig(**raw["data"]) if "data" in raw else None)
    except TypeError as err:
        raise UserError(f"{path} is damaged: bad [external] or [data] table ({err})") from None


def model_record_text(record: ModelRecord) -> str:
    import tomli_w

    raw = {"external": {"model": record.model, "weights_sha256": record.weights_sha256, "data": record.data,
                        "data_sha256": record.data_sha256}}
    if record.data_config is not None:
        raw["data"] = dict(record.data_config.__dict__)
    return tomli_w.dumps(raw)


def claim_model_run(run_dir: Path, record: ModelRecord) -> None:
    """Write a user's model run's config.toml, or check that `run_dir` already holds this same run."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a directory")
    path = run_dir / CONFIG
    text = model_record_text(record)
    if path.is_file() and path.read_text(encoding="utf-8") != text:
        raise UserError(f"{run_dir} already holds a different run; choose another --out")
    atomic_write_text(path, text)


# ----------------------------------------------------------------------------- checkpoints

def read_index(run_dir: Path, *, required: bool = True) -> pd.DataFrame:
    """checkpoints/index.csv, in the order the checkpoints were written (an empty frame when absent and
    not required)."""
    path = Path(run_dir) / INDEX
    if not path.is_file() and not required:
        return pd.DataFrame(columns=INDEX_COLUMNS + ["sha256"])
    fix = "rerun the training (`robustmargin train ... --resume`) or the `attack --model` command that made it"
    if not path.is_file():
        raise UserError(f"{run_dir} has no checkpoints (no {path}); {fix}")
    frame = read_csv(path, INDEX_COLUMNS, fix=fix)
    if "sha256" not in frame:
        frame["sha256"] = ""
    try:
        frame["epoch"] = frame["epoch"].astype(int)
        frame["log10_loss"] = frame["log10_loss"].astype(float)
    except (TypeError, ValueError):
        raise UserError(f"{path} is damaged: an epoch or loss is not a number; {fix}") from None
    frame["sha256"] = ["" if pd.isna(v) else str(v) for v in frame["sha256"]]
    frame["name"], frame["file"] = frame["name"].astype(str), frame["file"].astype(str)
    return frame[INDEX_COLUMNS + ["sha256"]]


def write_index(run_dir: Path, frame: pd.DataFrame) -> None:
    frame = frame if "sha256" in frame else frame.assign(sha256="")
    atomic_write_csv(Path(run_dir) / INDEX, frame[INDEX_COLUMNS + ["sha256"]])


def record_checkpoint(run_dir: Path, model, *, name: str, epoch: int, log10_loss: float,
                      threshold_log10: float | None, meta: dict) -> None:
    """Save `checkpoints/NAME.pt` and put its row, with the SHA-256 of the file just written, in the index
    (replacing one of the same name). The file is written first: a kill between the two leaves a row whose
    hash the file no longer has, which `Run.checkpoints` refuses, never new weights under an old identity."""
    from robustmargin.checkpoints import save_checkpoint, same_checkpoint

    run_dir, file = Path(run_dir), f"{name}.pt"
    meta = {**meta, "name": name, "epoch": epoch}
    if not same_checkpoint(run_dir / "checkpoints" / file, model, meta):  # unchanged weights keep their hash
        save_checkpoint(run_dir / "checkpoints" / file, model, meta)
    index = read_index(run_dir, required=False)
    row = pd.DataFrame([{"name": name, "epoch": epoch, "log10_loss": log10_loss,
                         "threshold_log10": threshold_log10, "file": file,
                         "sha256": file_sha256(run_dir / "checkpoints" / file)}])
    write_index(run_dir, pd.concat([index[index["name"] != name], row], ignore_index=True) if len(index) else row)


# ----------------------------------------------------------------------------- attack settings and parts

def digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class AttackSettings:
    """What makes attack results comparable: the same first `points` of a split, the same attacks with the
    same options, the same batches. Results under different settings are never merged into one curve."""

    points: int
    attacks: tuple[str, ...]
    budget: str
    steps: int | None
    batch_size: int
    options: dict[str, dict[str, Any]]  # per attack, as the attack functions take them

    @property
    def id(self) -> str:
        return digest({"points": self.points, "attacks": list(self.attacks), "options": self.options,
                       "batch_size": self.batch_size})

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "points": self.points, "attacks": list(self.attacks), "budget": self.budget,
                "steps": self.steps, "batch_size": self.batch_size, "options": self.options}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AttackSettings":
        return cls(int(d["points"]), tuple(d["attacks"]), str(d["budget"]),
                   None if d["steps"] is None else int(d["steps"]), int(d["batch_size"]), dict(d["options"]))

    def batches(self) -> list[tuple[int, int]]:
        """(start, size) of each batch of the first `points` points."""
        return [(s, min(self.batch_size, self.points - s)) for s in range(0, self.points, self.batch_size)]

    def command(self, run_dir: Path, checkpoints: list[str] | None = None, split: str | None = None) -> str:
        """The attack command that (re)makes results under these settings."""
        steps = "" if self.steps is None else f" --steps {self.steps}"
        which = f" --checkpoints {','.join(checkpoints)}" if checkpoints else ""
        where = f" --split {split}" if split else ""
        return (f"robustmargin attack --run {run_dir} --n {self.points} --attacks {','.join(self.attacks)} "
                f"--budget {self.budget}{steps} --batch-size {self.batch_size}{which}{where}")


def describe_settings(settings: dict[str, Any]) -> str:
    """One line for tables and reports, from a settings.json dict."""
    steps = "" if settings.get("steps") is None else f", steps {settings['steps']}"
    return (f"attacks {' + '.join(settings['attacks'])} ({settings['budget']} budget{steps}, per-sample minimum) "
            f"on the first {settings['points']} points of each split, batches of {settings['batch_size']} "
            f"(settings {settings['id']})")


@dataclass(frozen=True)
class Unit:
    """One work unit: one batch of one split of one checkpoint (known by its file's hash) under one attack."""

    checkpoint: str
    sha256: str
    split: str
    attack: str
    start: int
    size: int


def part_path(run_dir: Path, unit: Unit, settings: AttackSettings) -> Path:
    # the points are not in the key: batches cover fixed index ranges, so a larger --n reuses the full ones
    key = digest({"attack": unit.attack, "options": settings.options[unit.attack],
                  "batch_size": settings.batch_size, "checkpoint_sha256": unit.sha256})
    return (run_dir / ROBUSTNESS / "parts" / unit.checkpoint / unit.split / f"{unit.attack}-{key}"
            / f"batch-{unit.start:06d}-{unit.size}.csv")


def read_part(part: Path, start: int, labels: list[int]) -> pd.DataFrame | None:
    """A finished batch holding exactly these points, or None if it must be (re)done: missing, labels that
    no longer match the data, or damaged (then set aside as *.bad, so the batch is redone)."""
    if not part.is_file():
        return None
    try:
        frame = pd.read_csv(part)
        if any(c not in frame for c in PART_COLUMNS) or len(frame) != len(labels):
            raise ValueError("not a part file")
        frame["distance"] = frame["distance"].astype(float)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        os.replace(part, part.with_suffix(".bad"))
        return None
    same = frame["index"].tolist() == list(range(start, start + len(labels))) and frame["label"].tolist() == labels
    return frame if same else None


def write_part(part: Path, frame: pd.DataFrame) -> None:
    atomic_write_csv(part, frame[list(PART_COLUMNS)])


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def write_adversarials(part: Path, x: np.ndarray) -> None:
    """A batch's verified points (the input where the attack failed), beside its part file."""
    atomic_write(part.with_suffix(".npz"), lambda tmp: Path(tmp).write_bytes(npz_bytes(x=x)))


def read_adversarials(part: Path, n: int) -> np.ndarray | None:
    try:
        with np.load(part.with_suffix(".npz"), allow_pickle=False) as f:
            x = f["x"]
    except (OSError, ValueError, KeyError):
        return None  # parts written before adversarials were kept
    return x if len(x) == n else None


def adversarials_file(checkpoint: str, split: str) -> str:
    return f"adversarials-{checkpoint}-{split}.npz"


# ----------------------------------------------------------------------------- views of the parts

@contextlib.contextmanager
def merge_lock(run_dir: Path) -> Iterator[None]:
    """Serialize merges (and request records) of concurrent attack processes on one machine."""
    folder = run_dir / ROBUSTNESS
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _link(path: Path, target: str) -> None:
    """Point the symbolic link `path` at `target` in one atomic rename (a real folder there, as a copy
    made without links leaves, is moved aside first)."""
    if path.is_symlink() and os.readlink(path) == target:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    aside = None
    if path.is_dir() and not path.is_symlink():
        aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
        os.replace(path, aside / path.name)
    os.replace(tmp, path)
    fsync_path(path.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def write_view(run_dir: Path, settings_id: str, texts: dict[str, str | bytes], *, current: bool = True) -> Path:
    """Write one settings set's merged files as a new view folder and link it into place (and make it the
    current set). Views of this set no longer linked are removed afterwards."""
    robustness = run_dir / ROBUSTNESS
    # named by the distances: the same results give the same view, whatever the attacks' timings were
    name = f"{settings_id}-{digest({'distances': texts['distances.csv']})}"
    # the view's name travels inside it, so a copy of the run made without links keeps its identity
    texts = {**texts, SETTINGS_FILE: json_text({**json.loads(texts[SETTINGS_FILE]), "view": name})}
    view = robustness / "views" / name
    if not view.is_dir():
        tmp = Path(tempfile.mkdtemp(dir=robustness / "views" if (robustness / "views").is_dir()
                                    else _mkdir(robustness / "views"), prefix=".new-"))
        for file, content in texts.items():
            if isinstance(content, bytes):
                atomic_write(tmp / file, lambda t, c=content: Path(t).write_bytes(c))
            else:
                atomic_write_text(tmp / file, content)
        os.replace(tmp, view)
        fsync_path(view.parent)
    (robustness / "settings").mkdir(exist_ok=True)
    _link(robustness / "settings" / settings_id, f"../views/{name}")
    if current:
        _link(robustness / "current", f"settings/{settings_id}")
        for file in VIEW_FILES:
            _link(robustness / file, f"current/{file}")
    for old in (robustness / "views").glob(f"{settings_id}-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    for old in (robustness / "views").glob(".new-*"):  # left by a kill
        shutil.rmtree(old, ignore_errors=True)
    return view


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def request_path(run_dir: Path, settings_id: str) -> Path:
    return run_dir / ROBUSTNESS / "requests" / f"{settings_id}.json"


def record_request(run_dir: Path, settings: AttackSettings, pairs: list[tuple[str, str]]) -> None:
    """Add the (checkpoint, split) pairs asked for to the set's request record, before any work, so that
    `status` can tell a finished set from one that a kill left partial."""
    path = request_path(run_dir, settings.id)
    record = read_json(path) or {**settings.as_dict(), "requested": []}
    old = [(r["checkpoint"], r["split"]) for r in record.get("requested", [])]
    wanted = [{"checkpoint": c, "split": s} for c, s in dict.fromkeys(old + pairs)]
    if wanted != record.get("requested"):
        atomic_write_text(path, json_text({**record, "requested": wanted}))


def requests(run_dir: Path) -> list[dict[str, Any]]:
    """Every settings set ever asked for on this run, most recent first."""
    paths = sorted((run_dir / ROBUSTNESS / "requests").glob("*.json"), key=lambda p: p.stat().st_mtime,
                   reverse=True)
    return [r for r in (read_json(p) for p in paths) if r is not None and "id" in r]


@dataclass
class Results:
    """One merged view of attack results: its settings.json and its CSV files, all from one folder."""

    folder: Path
    settings: dict[str, Any]
    _frames: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return str(self.settings.get("id", ""))

    @property
    def view(self) -> str:
        return str(self.settings.get("view", self.folder.name))

    def frame(self, name: str) -> pd.DataFrame:
        if name not in self._frames:
            columns = {"distances": DISTANCE_COLUMNS, "points": ("checkpoint", "split", "index", "distance")}
            frame = read_csv(self.folder / f"{name}.csv", columns.get(name, ()),
                             fix="rerun `robustmargin attack` with the same settings to rebuild it")
            if "distance" in frame:
                try:
                    frame["distance"] = frame["distance"].astype(float)
                except ValueError:
                    raise UserError(f"{self.folder / (name + '.csv')} is damaged: a distance is not a number; "
                                    f"rerun `robustmargin attack`") from None
            self._frames[name] = frame
        return self._frames[name].copy()

    @property
    def distances(self) -> pd.DataFrame:
        return self.frame("distances")

    @property
    def points(self) -> pd.DataFrame:
        return self.frame("points")

    @property
    def curves(self) -> pd.DataFrame:
        return self.frame("curves")

    def adversarials(self, checkpoint: str, split: str) -> dict[int, np.ndarray]:
        """index → the best adversarial image found for that point (points with none are absent)."""
        path = self.folder / adversarials_file(checkpoint, split)
        if not path.is_file():
            return {}
        with np.load(path, allow_pickle=False) as f:
            return {int(i): x for i, x in zip(f["index"], f["x"])}

    def pairs(self) -> list[tuple[str, str, str]]:
        """(checkpoint, split, sha256) of every merged result."""
        return [(r["checkpoint"], r["split"], r.get("sha256", "")) for r in self.settings.get("results", [])]


def read_view(folder: Path) -> Results | None:
    if not folder.is_dir():
        return None
    settings = read_json(folder / SETTINGS_FILE)
    if settings is None or "id" not in settings:
        return None
    return Results(folder.resolve(), settings)


# ----------------------------------------------------------------------------- the run

class Run:
    """A run directory, opened once. Raises UserError when `path` is not a run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"run directory {self.path} does not exist (no config.toml)" if not self.path.exists()
                            else f"{self.path} is a file, not a run directory")
        if not (self.path / CONFIG).is_file():
            raise UserError(f"{self.path} is not a run directory (no config.toml)")
        self.record = read_model_record(self.path)
        if self.record is None:
            from robustmargin.config import load_config
            self.config = load_config(self.path / CONFIG)
        else:
            self.config = None
        self._data = None
        self._live = None  # a module handed to `evaluate`, used while it runs

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # --- what the run is -----------------------------------------------------------------------
    @property
    def has_history(self) -> bool:
        """Trained here: metrics.csv, companions and the paper's claims apply."""
        return self.record is None

    @property
    def kind(self) -> str:
        return "trained" if self.record is None else "user model"

    @property
    def loss(self) -> str:
        return self.config.train.loss if self.config is not None else "ce"

    @property
    def splits(self) -> tuple[str, ...]:
        if self.record is not None and self.record.data_config is None:
            return ("test",)  # an .npz file is a test split only
        return SPLITS

    def config_values(self) -> dict[str, Any]:
        """The run's configuration flattened to dotted keys (lists as text, so they compare and show)."""
        if self.config is None:
            flat = {"external.model": self.record.model, "external.data": self.record.data}
            return flat
        flat = {}
        for section, table in self.config.to_dict().items():
            for key, value in table.items():
                flat[f"{section}.{key}"] = " ".join(map(str, value)) if isinstance(value, list) else value
        return flat

    # --- data ----------------------------------------------------------------------------------
    def data(self) -> dict:
        """{split: (x, y)}: exactly the data the run used, loaded once."""
        if self._data is None:
            from robustmargin.data import load_data, load_npz

            if self.record is None:
                self._data = load_data(self.config.data)
            elif self.record.data_config is not None:
                self._data = load_data(self.record.data_config)
            else:
                path = stored_path(self.record.data, self.path)
                if not path.is_file() or file_sha256(path) != self.record.data_sha256:
                    raise UserError(f"data file {path} is missing or changed since the run was made "
                                    f"(SHA-256 differs)")
                self._data = {"test": load_npz(path)}
        return self._data

    def split(self, split: str):
        if split not in SPLITS:
            raise UserError(f"split must be 'train' or 'test', got {split!r}")
        if split not in self.splits:
            raise UserError(f"{self.path} evaluates an .npz file, which is its test split only")
        return self.data()[split]

    # --- checkpoints ---------------------------------------------------------------------------
    def checkpoints(self, *, required: bool = True) -> pd.DataFrame:
        """checkpoints/index.csv with each file's SHA-256 checked against its row."""
        index = read_index(self.path, required=required)
        if required and index.empty:
            raise UserError(f"{self.path / INDEX} lists no checkpoints")
        shas = []
        for r in index.itertuples(index=False):
            file = self.path / "checkpoints" / r.file
            if not file.is_file():
                raise UserError(f"checkpoint file {file} is missing; rerun the command that wrote it")
            sha = file_sha256(file)
            if r.sha256 and r.sha256 != sha:
                raise UserError(f"{file} does not match its row in {self.path / INDEX} (a save was "
                                f"interrupted); rerun the training with --resume to write it again")
            shas.append(sha)
        return index.assign(sha256=shas)

    def load_model(self, file: str):
        """The model of one checkpoint file, in eval mode on the CPU."""
        if self._live is not None:
            return self._live.eval()
        if self.record is None:
            from robustmargin.checkpoints import load_checkpoint
            return load_checkpoint(self.path / "checkpoints" / file)[0]
        if self.record.live:
            raise UserError(f"{self.path} was made from a live module {self.record.model}; rerun "
                            f"robustmargin.evaluate on it")
        from robustmargin.usermodel import build_module, load_weights

        model = build_module(stored_spec(self.record.model, self.path))
        load_weights(model, self.path / "checkpoints" / file)
        return model.eval()

    @contextlib.contextmanager
    def attached(self, model) -> Iterator["Run"]:
        """Serve `model` (a live module) as this run's model for the length of a block."""
        self._live = model
        try:
            yield self
        finally:
            self._live = None

    # --- training history ----------------------------------------------------------------------
    def metrics(self) -> pd.DataFrame | None:
        """metrics.csv (None for a user's model)."""
        if not self.has_history:
            return None
        columns = ("epoch", "log10_loss", "train_acc", "test_acc", "normalized_margin",
                   "normalized_margin_layerwise", "smoothed_normalized_margin")
        frame = read_csv(self.path / METRICS, columns, fix="train first, or `train --resume` to rewrite it")
        if frame.empty:
            raise UserError(f"{self.path / METRICS} has no rows; train first")
        try:
            frame["epoch"] = frame["epoch"].astype(int)
        except (TypeError, ValueError):
            raise UserError(f"{self.path / METRICS} is damaged: an epoch is not a number; "
                            f"`train --resume` rewrites it from the last saved state") from None
        return frame

    def companions(self) -> dict[str, tuple[str, pd.DataFrame]]:
        """This run and its companions (RUN/companions/NAME/), keyed by a legend label, with their schedules."""
        if not self.has_history:
            return {}
        schedule = self.config.train.schedule
        runs = {f"{schedule} (this run)": (schedule, self.metrics())}
        folder = self.path / "companions"
        for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
            if (sub / CONFIG).is_file() and (sub / METRICS).is_file():
                other = Run(sub)
                label = other.config.train.schedule if sub.name == other.config.train.schedule else \
                    f"{other.config.train.schedule} ({sub.name})"
                runs[label] = (other.config.train.schedule, other.metrics())
        return runs

    # --- attack results ------------------------------------------------------------------------
    def results(self, settings_id: str | None = None) -> Results | None:
        """The current view of attack results (or that of one settings set), None when there is none."""
        robustness = self.path / ROBUSTNESS
        folder = robustness / "current" if settings_id is None else robustness / "settings" / settings_id
        view = read_view(folder)
        if view is None and settings_id is None and (robustness / "distances.csv").is_file() \
                and not (robustness / "distances.csv").is_symlink():
            raise UserError(f"{robustness / 'distances.csv'} was written without checkpoint hashes; rerun "
                            f"`robustmargin attack --run {self.path}` to rebuild the results")
        return view

    def stale_results(self, results: Results) -> list[tuple[str, str]]:
        """(checkpoint, split) pairs of `results` whose checkpoint file has changed or gone since."""
        now = dict(zip(self.checkpoints(required=False)["name"], self.checkpoints(required=False)["sha256"]))
        return [(c, s) for c, s, sha in results.pairs() if now.get(c) != sha or not sha]

    def fresh_results(self) -> Results | None:
        """The current results, refused with one line when one of them came from an earlier checkpoint."""
        results = self.results()
        if results is None:
            return None
        stale = self.stale_results(results)
        if stale:
            names = sorted({c for c, _ in stale})
            settings = AttackSettings.from_dict(results.settings)
            raise UserError(f"the attack results of checkpoint {', '.join(names)} were computed on an earlier "
                            f"version of its file; refresh them with `{settings.command(self.path, names)}`")
        return results

    def epsilons(self) -> list[float] | None:
        """The ε chosen with `attack --eps` (robustness/epsilons.json), or None."""
        record = read_json(self.path / ROBUSTNESS / "epsilons.json")
        return None if record is None else [float(e) for e in record.get("epsilons", [])] or None

    def choose_epsilons(self, epsilons: list[float]) -> None:
        atomic_write_text(self.path / ROBUSTNESS / "epsilons.json", json_text({"epsilons": list(epsilons)}))

    # --- analysis outputs ----------------------------------------------------------------------
    def inputs(self, results: Results | None) -> dict[str, Any]:
        """What the analysis of this run reads: every checkpoint's hash, the results view, metrics.csv."""
        index = self.checkpoints()
        metrics = self.path / METRICS
        return {"checkpoints": dict(zip(index["name"], index["sha256"])),
                "results": None if results is None else results.view,
                "metrics": file_sha256(metrics) if self.has_history and metrics.is_file() else None}

    def write_provenance(self, inputs: dict[str, Any]) -> None:
        """Written last by the analysis: the tables are complete and came from these inputs."""
        atomic_write_text(self.path / PROVENANCE, json_text(inputs))

    def tables_state(self) -> tuple[str, str]:
        """(missing | partial | stale | done, detail) of the analysis's tables against the run now."""
        tables = sorted((self.path / TABLES).glob("*.csv"))
        made = read_json(self.path / PROVENANCE)
        if made is None:
            return ("missing", "no tables") if not tables else ("partial", f"{len(tables)} tables written, "
                                                                           f"the analysis did not finish")
        if any(p.stat().st_mtime_ns > (self.path / PROVENANCE).stat().st_mtime_ns for p in tables):
            return "partial", "tables newer than their record: an analysis did not finish"
        if not (self.path / ROBUSTNESS / "certified.csv").is_file():
            return "partial", "robustness/certified.csv is missing"
        try:
            results = self.results()
            now = self.inputs(results)
        except UserError as err:
            return "stale", str(err)
        changed = [f"checkpoint {c}" for c in sorted(set(made.get("checkpoints", {})) | set(now["checkpoints"]))
                   if made.get("checkpoints", {}).get(c) != now["checkpoints"].get(c)]
        if made.get("results") != now["results"]:
            changed.append("the attack results")
        if made.get("metrics") != now["metrics"]:
            changed.append("metrics.csv")
        if changed:
            return "stale", f"{', '.join(changed)} changed since the tables were made"
        return "done", f"{len(tables)} tables"

    def fresh_tables(self) -> None:
        """Refuse, with one line, tables that do not belong to the run as it is now."""
        state, detail = self.tables_state()
        if state != "done":
            raise UserError(f"the tables of {self.path} are {state} ({detail}); refresh them with "
                            f"`robustmargin analyze --run {self.path}`")

    def table(self, name: str, columns: tuple[str, ...] = (), *, required: bool = True) -> pd.DataFrame | None:
        return read_csv(self.path / TABLES / f"{name}.csv", columns, required=required,
                        fix=f"rerun `robustmargin analyze --run {self.path}`")

    def notes(self) -> list[str]:
        path = self.path / NOTES
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line] if path.is_file() else []


def adversarial_examples(run_dir: str | Path, checkpoint: str | None = None, split: str = "test"
                         ) -> dict[int, np.ndarray]:
    """index → the best adversarial image of each attacked point of `split` at `checkpoint` (default: the
    last in the index), from the run's current attack results."""
    run = Run(run_dir)
    results = run.fresh_results()
    if results is None:
        raise UserError(f"{run.path} has no attack results; run `robustmargin attack` first")
    name = checkpoint or str(run.checkpoints()["name"].iloc[-1])
    return results.adversarials(name, split)


def load_split(run_dir: str | Path, split: str):
    """Exactly the (x, y) that the run in `run_dir` used for `split` ("train" or "test")."""
    return Run(run_dir).split(split)


def stored_spec(spec: str, run_dir: Path) -> str:
    """A stored SPEC's file part resolved as `stored_path` does (package.module specs are unchanged)."""
    where, sep, name = spec.rpartition(":")
    if sep and where.endswith(".py"):
        return f"{stored_path(where, run_dir)}:{name}"
    return spec


def portable_spec(spec: str, run_dir: Path) -> str:
    where, sep, name = spec.rpartition(":")
    if sep and (where.endswith(".py") or Path(where).is_file()):
        return f"{portable_path(where, run_dir)}:{name}"
    return spec


__all__ = ["AttackSettings", "ModelRecord", "Results", "Run", "Unit", "describe_settings", "file_sha256",
           "load_split", "part_path", "read_csv"]

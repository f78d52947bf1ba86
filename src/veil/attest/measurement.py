"""Measurement of Veil's trusted components in the simulated TEE.

Real TEEs measure the loaded code in hardware (MRENCLAVE, MRTD, MEASUREMENT). The simulated TEE
stands in with SHA-256 over exactly what the component's program can run:

- every Veil module in the import closure of its entry module, found statically (imports inside
  functions count, so lazily imported code is measured too; the `__init__.py` of every package
  on the way counts, as importing a submodule runs it), by relative path and bytes;
- `name==version` of every third-party distribution those modules import, and of every
  installed distribution those require (Requires-Dist, recursively);
- what the interpreter runs before the program in every process: the import lines of the site
  directories' `.pth` files (and the distributions they import), and a `sitecustomize`.

So a changed byte anywhere in what runs gives a different measurement and is refused keys, and a
change outside it (the CLI, the SDK, the HE compiler, a demo) does not force every owner and user
to approve a new runtime. Nothing is cached on disk (the operator controls the disk): the closure
is recomputed at every cold start, which is why imports are found by one regular-expression pass
over the source instead of a full parse (tests check it finds exactly what `ast` finds).

Requirements follow pip's meaning: a requirement counts when its environment marker holds and,
if it belongs to an extra, when that extra was asked for by the requirement that brought the
distribution in (`uvicorn[standard]`); distributions that are not installed cannot run and are
skipped. A few packages import an extra's packages whenever they are installed, asked for or not
(`_AUTODETECTED_EXTRAS`); those extras count when installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import site
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import veil

# Each trusted component and the module its trusted code starts from. The KeyService is started
# through the CLI (`python -m veil.cli keyservice serve`), but its trusted code is the server
# module and what it imports; the click wrapper around it is not part of the measurement.
ENTRIES: dict[str, str] = {
    "runtime": "veil.runtime.__main__",
    "keyservice": "veil.keyservice.__main__",
}
COMPONENTS = ENTRIES  # the choices of `veil measure --component`

# Imports static analysis cannot see: `veil.attest.verify` loads the real verifiers with
# importlib from a table (a test checks this mirrors that table).
DYNAMIC_IMPORTS: dict[str, tuple[str, ...]] = {
    "veil.attest.verify": ("veil.attest.dcap", "veil.attest.snp"),
}

# Extras whose packages the distribution imports on its own whenever they are installed:
# uvicorn picks uvloop, httptools, websockets and watchfiles when present; httpx's decoders
# import brotli and zstandard when present.
_AUTODETECTED_EXTRAS: dict[str, tuple[str, ...]] = {
    "uvicorn": ("standard",),
    "httpx": ("brotli", "zstd"),
}

_VERSION = "veil-measurement-v2"
_WS = r"[ \t]*(?:\\\n[ \t]*)*"  # blanks, backslash-continued lines included
# One left-to-right pass that stops only at characters that can start a comment, a string or a
# statement (`#`, a quote, a newline, `;`, `:`), so it runs at C speed over ordinary code.
# Comments and strings are consumed whole, so an `import` inside a docstring is never taken for a
# statement; outside them `import` is a keyword that only starts or continues an import. String
# prefixes (r, b, f) need no handling: the string is matched from its quote either way.
_LEX = re.compile(
    r"[#'\"\n;:](?:"
    r"(?<=#)[^\n]*"
    r"|(?<=')(?:''[^'\\]*(?:(?:\\.|'(?!''))[^'\\]*)*'''|[^'\\\n]*(?:\\.[^'\\\n]*)*')"
    r'|(?<=")(?:""[^"\\]*(?:(?:\\.|"(?!""))[^"\\]*)*"""|[^"\\\n]*(?:\\.[^"\\\n]*)*")'
    r"|(?<=[\n;:])[ \t]*(?:"
    rf"from\b{_WS}(?P<src>\.*[\w.]*){_WS}\bimport\b"
    rf"(?P<names>{_WS}\((?:#[^\n]*|[^)#])*\)|(?:[^\n#;\\]|\\\n)*)"
    r"|import\b(?P<mods>(?:[^\n#;\\]|\\\n)*)"
    r"))",
    re.S,
)
_COMMENT = re.compile(r"#[^\n]*")
_PTH_IMPORT = re.compile(r"\bimport[ \t]+([\w.]+)|__import__\(\s*['\"]([\w.]+)|import_module\(\s*['\"]([\w.]+)")
_HEADER = re.compile(r"^(Version|Requires-Dist):[ \t]*(.*?)[ \t]*$", re.M)
_REQUIREMENT = re.compile(r"\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(?:\[([^\]]*)\])?[^;]*(?:;(.*))?")
_STDLIB = frozenset(sys.stdlib_module_names)


@dataclass(frozen=True)
class Closure:
    """What a component's program can run: the measured input, in the order it is hashed."""

    component: str
    files: dict[str, bytes]  # path relative to the veil package -> bytes, sorted by path
    modules: frozenset[str]  # the Veil modules those files are
    distributions: dict[str, str]  # normalized distribution name -> version, sorted by name
    startup: tuple[str, ...] = ()  # the `.pth` import lines the interpreter runs first
    unowned: dict[str, str] = field(default_factory=dict)  # module no distribution owns -> file hash

    def digest(self) -> str:
        h = hashlib.sha256(f"{_VERSION}\0{self.component}\0".encode())
        for rel, data in self.files.items():
            name = rel.encode()
            h.update(len(name).to_bytes(4, "big") + name + len(data).to_bytes(8, "big") + data)
        for dist, version in self.distributions.items():
            h.update(f"dist {dist}=={version}\0".encode())
        for line in self.startup:
            h.update(f"pth {line}\0".encode())
        for module, file_hash in sorted(self.unowned.items()):
            h.update(f"unowned {module} {file_hash}\0".encode())
        return h.hexdigest()


def measure(component: str = "runtime", package_root: Path | None = None) -> str:
    """Hex SHA-256 measurement of `component` as found under `package_root` (default: installed)."""
    return closure(component, package_root).digest()


def closure(component: str = "runtime", package_root: Path | None = None) -> Closure:
    """The import closure of `component`'s entry module, Veil files read from `package_root`
    (the `veil` package directory; default: the imported one), distributions from sys.path."""
    if component not in ENTRIES:
        raise ValueError(f"component must be one of {sorted(ENTRIES)}")
    root = Path(package_root) if package_root is not None else Path(veil.__file__).parent
    files, modules, external = _veil_closure(root, ENTRIES[component])
    startup, startup_names = _startup()
    dists = _Distributions()
    owners = dists.owners(external | startup_names)
    unowned: dict[str, str] = {}
    for name in sorted((external | startup_names) - owners.keys()):
        found = _unowned_file(name)
        if found is not None:
            unowned[name] = found
    return Closure(
        component=component,
        files={rel: files[rel] for rel in sorted(files)},
        modules=frozenset(modules),
        distributions=dists.closure(set().union(*owners.values())),
        startup=startup,
        unowned=unowned,
    )


# --- Veil modules ------------------------------------------------------------------------------
def imports(source: str) -> list[tuple[str, int, tuple[str, ...]]]:
    """The import statements of `source`, wherever they are (functions too), as
    (module, level, names): `import a.b` is ("a.b", 0, ()), `from ..x import y` ("x", 2, ("y",))."""
    found: list[tuple[str, int, tuple[str, ...]]] = []
    # findall, not finditer: most matches are comments and strings, and skipping them costs no
    # Python call. A statement always has a non-empty module part (`from .` has ".").
    for src, names, mods in _LEX.findall("\n" + source):
        if mods:
            found.extend((item, 0, ()) for item in _items(mods))
        elif src:
            module = src.lstrip(".")
            found.append((module, len(src) - len(module), tuple(_items(names))))
    return found


def _items(text: str) -> list[str]:
    """The names of an import list: `(a as b,\\n c)` -> [a, c]."""
    if "#" in text:
        text = _COMMENT.sub("", text)
    text = text.replace("\\\n", " ").strip().strip("()")
    return [part.split()[0] for part in text.split(",") if part.strip()]


class _Tree:
    """The veil package directory, listed once per directory (stat calls per candidate module
    name dominated the closure's time)."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self._listings: dict[str, frozenset[str]] = {}

    def _listing(self, directory: str) -> frozenset[str]:
        listing = self._listings.get(directory)
        if listing is None:
            try:
                listing = frozenset(os.listdir(directory))
            except OSError:
                listing = frozenset()
            self._listings[directory] = listing
        return listing

    def module_file(self, module: str) -> str | None:
        """The path (relative to the root, with /) of Veil module `module`, if it is one."""
        parts = module.split(".")[1:]
        directory = os.path.join(self.root, *parts[:-1]) if parts else self.root
        if not parts:
            return "__init__.py" if "__init__.py" in self._listing(directory) else None
        listing = self._listing(directory)
        rel = "/".join(parts)
        if parts[-1] in listing and "__init__.py" in self._listing(os.path.join(directory, parts[-1])):
            return rel + "/__init__.py"
        if parts[-1] + ".py" in listing:
            return rel + ".py"
        return None

    def read(self, rel: str) -> bytes:
        with open(os.path.join(self.root, rel), "rb") as f:
            return f.read()


def _veil_closure(root: Path, entry: str) -> tuple[dict[str, bytes], set[str], set[str]]:
    """(files by relative path, Veil module names, third-party top-level names) reachable from `entry`."""
    tree = _Tree(root)
    files: dict[str, bytes] = {}
    modules: set[str] = set()
    external: set[str] = set()
    todo = [entry]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        rel = tree.module_file(module)
        if rel is None:  # a name imported from a module, not a module
            continue
        modules.add(module)
        data = files[rel] = tree.read(rel)
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        todo.extend(DYNAMIC_IMPORTS.get(module, ()))
        package = module if rel.endswith("__init__.py") else module.rpartition(".")[0]
        for target, level, names in imports(data.decode("utf-8", errors="replace")):
            if level:
                base = package.split(".")
                base = base[: len(base) - level + 1]
                target = ".".join([*base, target] if target else base)
            top = target.partition(".")[0]
            if top == "veil":
                todo.append(target)
                todo.extend(f"{target}.{name}" for name in names if name != "*")
            elif top and top not in _STDLIB:
                external.add(top)
    return files, modules, external


# --- distributions -----------------------------------------------------------------------------
def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class _Distributions:
    """Installed distributions by normalized name (the first on sys.path wins, as for imports)."""

    def __init__(self) -> None:
        self.by_name: dict[str, metadata.Distribution] = {}
        for dist in metadata.distributions():
            name = getattr(dist, "_normalized_name", None) or dist.metadata["Name"] or ""
            self.by_name.setdefault(_normalize(name), dist)

    def owners(self, tops: set[str]) -> dict[str, set[str]]:
        """Which distributions provide each top-level import name in `tops` (names none provides
        are left out). What `packages_distributions()` answers (top_level.txt where a distribution
        has one, else the first component of its RECORD paths), but only for the names asked, by
        one regular-expression search per RECORD instead of building every file list."""
        found: dict[str, set[str]] = {}
        if not tops:
            return found
        in_record = re.compile(
            r"\n(" + "|".join(map(re.escape, sorted(tops))) + r")(?:/|(?:\.[\w-]+)*\.(?:py|so|pyd),)"
        )
        for name, dist in self.by_name.items():
            declared = dist.read_text("top_level.txt")
            if declared and declared.strip():
                provided = tops.intersection(line.strip() for line in declared.splitlines())
            else:
                provided = set(in_record.findall("\n" + (dist.read_text("RECORD") or "")))
            for top in provided:
                found.setdefault(top, set()).add(name)
        return found

    def closure(self, names: set[str]) -> dict[str, str]:
        """name -> version of `names` and of every installed distribution they require, recursively."""
        versions: dict[str, str] = {}
        extras_done: dict[str, set[str]] = {}
        todo: list[tuple[str, frozenset[str]]] = [(n, frozenset()) for n in sorted(names)]
        while todo:
            name, extras = todo.pop()
            dist = self.by_name.get(name)
            if dist is None:  # not installed: nothing of it can run
                continue
            done = extras_done.get(name)
            wanted = {""} | set(extras) | set(_AUTODETECTED_EXTRAS.get(name, ()))
            new = wanted - done if done is not None else wanted
            if not new:
                continue
            extras_done.setdefault(name, set()).update(new)
            version, requirements = _metadata(dist)
            versions[name] = version
            for requirement in requirements:
                req = _REQUIREMENT.match(requirement)
                if req is None:
                    continue
                marker = (req.group(3) or "").strip()
                if not marker or any(_marker_holds(marker, extra) for extra in sorted(new)):
                    req_extras = frozenset(_normalize(e.strip()) for e in (req.group(2) or "").split(",") if e.strip())
                    todo.append((_normalize(req.group(1)), req_extras))
        return dict(sorted(versions.items()))


def _metadata(dist: metadata.Distribution) -> tuple[str, list[str]]:
    """(Version, Requires-Dist) from the metadata headers, read with one regular expression
    instead of the email parser; egg-info distributions keep theirs in requires.txt, which
    `Distribution.requires` translates."""
    text = dist.read_text("METADATA")
    if text is None:
        return dist.version or "unknown", list(dist.requires or [])
    version, requirements = "unknown", []
    for key, value in _HEADER.findall(text.split("\n\n", 1)[0]):
        if key == "Version":
            version = value
        else:
            requirements.append(value)
    return version, requirements


def _unowned_file(top: str) -> str | None:
    """A hash of the file the import system would load for `top`, a module no distribution owns
    (None when there is none), so a stray module dropped on sys.path changes the measurement."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not spec.has_location or spec.origin is None:
        return "namespace"
    try:
        return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


# --- environment markers (PEP 508), evaluated without eval ----------------------------------------
_MARKER_TOKEN = re.compile(
    r"\s*(\(|\)|===|==|!=|<=|>=|~=|<|>|not\s+in\b|in\b|and\b|or\b|'[^']*'|\"[^\"]*\"|[A-Za-z_][\w.]*)"
)
_RELEASE = re.compile(r"\d+(?:\.\d+)*")


def _marker_env() -> dict[str, str]:
    import platform

    impl = sys.implementation
    version = impl.version
    impl_version = f"{version.major}.{version.minor}.{version.micro}"
    if version.releaselevel != "final":
        impl_version += version.releaselevel[0] + str(version.serial)
    return {
        "os_name": os.name,
        "sys_platform": sys.platform,
        "platform_machine": platform.machine(),
        "platform_python_implementation": platform.python_implementation(),
        "platform_release": platform.release(),
        "platform_system": platform.system(),
        "platform_version": platform.version(),
        "python_version": ".".join(platform.python_version_tuple()[:2]),
        "python_full_version": platform.python_version(),
        "implementation_name": impl.name,
        "implementation_version": impl_version,
    }


_ENV: dict[str, str] = {}


def _marker_holds(marker: str, extra: str) -> bool:
    """Whether `marker` holds here with `extra` asked for ("" for none). A marker this parser
    does not understand counts as holding: measuring one distribution too many is safe."""
    if not _ENV:
        _ENV.update(_marker_env())
    marker = marker.rstrip()
    tokens: list[str] = []
    pos = 0
    while pos < len(marker):
        m = _MARKER_TOKEN.match(marker, pos)
        if m is None:
            return True
        tokens.append(m.group(1))
        pos = m.end()
    try:
        value, rest = _or(tokens, {**_ENV, "extra": extra})
    except (IndexError, ValueError):
        return True
    return value if not rest else True


def _or(tokens: list[str], env: dict[str, str]) -> tuple[bool, list[str]]:
    value, tokens = _and(tokens, env)
    while tokens and tokens[0] == "or":
        right, tokens = _and(tokens[1:], env)
        value = value or right
    return value, tokens


def _and(tokens: list[str], env: dict[str, str]) -> tuple[bool, list[str]]:
    value, tokens = _atom(tokens, env)
    while tokens and tokens[0] == "and":
        right, tokens = _atom(tokens[1:], env)
        value = value and right
    return value, tokens


def _atom(tokens: list[str], env: dict[str, str]) -> tuple[bool, list[str]]:
    if tokens[0] == "(":
        value, tokens = _or(tokens[1:], env)
        if not tokens or tokens[0] != ")":
            raise ValueError("unbalanced parenthesis")
        return value, tokens[1:]
    left, op, right = tokens[0], tokens[1], tokens[2]
    extra = "extra" in (left, right)
    return _compare(_value(left, env, extra), " ".join(op.split()), _value(right, env, extra)), tokens[3:]


def _value(token: str, env: dict[str, str], extra: bool) -> str:
    if token[0] in "'\"":
        value = token[1:-1]
    elif token in env:
        value = env[token]
    else:
        raise ValueError(f"unknown marker variable {token}")
    return _normalize(value) if extra else value


def _compare(left: str, op: str, right: str) -> bool:
    if op == "in":
        return left in right
    if op == "not in":
        return left not in right
    if op == "===":
        return left == right
    if op in ("==", "!=") and right.endswith(".*") and _RELEASE.fullmatch(left):
        equal = _release(left)[: len(_release(right[:-2]))] == _release(right[:-2])
        return equal if op == "==" else not equal
    if _RELEASE.fullmatch(left) and _RELEASE.fullmatch(right):
        a, b = _release(left), _release(right)
        width = max(len(a), len(b))
        a, b = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
        if op == "~=":
            prefix = _release(right)[:-1]
            return a >= b and _release(left)[: len(prefix)] == prefix
        return {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
    if op == "==":
        return left == right
    if op == "!=":
        return left != right
    raise ValueError(f"cannot compare {left!r} {op} {right!r}")


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


# --- interpreter start-up ----------------------------------------------------------------------
def _startup() -> tuple[tuple[str, ...], set[str]]:
    """The `.pth` import lines `site` runs in every process, and the top-level modules named in
    them and imported by `site` itself (`sitecustomize`, `usercustomize`)."""
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    names = {"sitecustomize"}
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
        names.add("usercustomize")
    lines: list[str] = []
    for directory in dict.fromkeys(dirs):
        try:
            entries = sorted(e for e in os.listdir(directory) if e.endswith(".pth") and not e.startswith("."))
        except OSError:
            continue
        for entry in entries:
            try:
                text = Path(directory, entry).read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith(("import ", "import\t")):
                    lines.append(f"{entry}: {line.rstrip()}")
                    for groups in _PTH_IMPORT.findall(line):
                        top = next(g for g in groups if g).partition(".")[0]
                        if top not in _STDLIB:
                            names.add(top)
    return tuple(lines), names

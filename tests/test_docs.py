"""The docs cannot drift from the code: README.md and docs/*.md are checked against the tree, the CLI and the config.

- every relative link (a file, a file's #anchor, an #anchor of the same page; GitHub's heading slugs) resolves;
- every `distill-pipe <command>` and every `--flag` the docs show, in fenced shell blocks and in inline code,
  exists in the CLI (read from the typer app through click, so the checker takes any app: `check_cli`);
- every `--set KEY=...` / `dvc exp run -S KEY=...` key and every inline `section.key` is a key of
  distill_pipe/config.py (`students.<name>.<train key>` and `students.<name>.init...` included);
- a flag given to a benchmark script (`python benchmarks/x.py --flag`, or `x.py --flag` inline) is one it has;
- docs/params.md lists every config key with its default and the demo's value, docs/architecture.md names every
  module, and the README's two commands are what .ci/run runs.

No model is loaded; the checks take a few seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shlex
import typing
from pathlib import Path

import pytest
import typer.main

from distill_pipe import config as config_mod

REPO = Path(__file__).resolve().parents[1]
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "text"}
FILE_ENDINGS = {"py", "md", "json", "csv", "zarr", "yaml", "yml", "png", "lock", "sh", "txt", "jsonl", "parquet",
                "gguf", "bin", "toml"}


def doc_files(root: Path = REPO) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


# ---------------------------------------------------------------------------------------------- markdown

@dataclasses.dataclass
class Snippet:
    """A piece of a markdown file: a fenced block's body, an inline code span or a paragraph of prose."""

    path: Path
    line: int
    kind: str  # "block", "code" (inline) or "prose"
    text: str
    lang: str = ""
    heading: str = ""  # the heading the snippet stands under

    def where(self, root: Path) -> str:
        try:
            name = self.path.relative_to(root)
        except ValueError:
            name = self.path
        return f"{name}:{self.line}"


def parse_markdown(path: Path) -> list[Snippet]:
    """Fenced blocks, and the paragraphs outside them with their inline code spans (a span may cross a line)."""
    out: list[Snippet] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    fence, lang, body, start = None, "", [], 0
    para: list[tuple[int, str]] = []
    headings: list[tuple[int, str]] = [(0, "")]

    def under(line: int) -> str:
        return [h for n, h in headings if n <= line][-1]

    def flush():
        if para:
            first = para[0][0]
            text = "\n".join(t for _, t in para)
            out.append(Snippet(path, first, "prose", text, heading=under(first)))
            for m in re.finditer(r"(`+)(.+?)\1", text, flags=re.S):
                line = first + text.count("\n", 0, m.start())
                out.append(Snippet(path, line, "code", re.sub(r"\s*\n\s*", " ", m.group(2).strip()),
                                   heading=under(line)))
            para.clear()

    for i, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is None:
            m = re.match(r"(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if m:
                flush()
                fence, lang, body, start = m.group(1), m.group(2).lower(), [], i + 1
            elif stripped:
                if re.match(r"#{1,6}\s", stripped):
                    headings.append((i, stripped.lstrip("#").strip()))
                para.append((i, line))
            else:
                flush()
        elif stripped.startswith(fence):
            out.append(Snippet(path, start, "block", "\n".join(body), lang, heading=under(start)))
            fence = None
        else:
            body.append(line)
    flush()
    return out


def github_slug(title: str, seen: dict[str, int]) -> str:
    """The anchor GitHub gives a heading: its text lowercased, punctuation dropped, spaces to '-', '-N' on repeats."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "").replace("*", "")
    slug = "".join(c for c in text.strip().lower() if c.isalnum() or c in "-_ ").replace(" ", "-")
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    return slug if n == 0 else f"{slug}-{n}"


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    return {github_slug(m.group(1), seen) for s in parse_markdown(path) if s.kind == "prose"
            for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", s.text, flags=re.M)}


# ---------------------------------------------------------------------------------------------- links

def check_links(files: list[Path]) -> list[str]:
    """Problems with relative links: a missing file, or an #anchor that no heading of the target has."""
    problems, cache = [], {}
    for path in files:
        for s in parse_markdown(path):
            if s.kind != "prose":
                continue
            text = re.sub(r"(`+).+?\1", "", s.text, flags=re.S)  # links inside code are not links
            for m in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text):
                target = m.group(1)
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (path.parent / file_part).resolve() if file_part else path
                if not dest.exists():
                    problems.append(f"{s.where(REPO)}: link {target}: {file_part} does not exist")
                    continue
                if anchor:
                    if dest.suffix != ".md":
                        problems.append(f"{s.where(REPO)}: link {target}: an anchor into a non-markdown file")
                        continue
                    if dest not in cache:
                        cache[dest] = anchors(dest)
                    if anchor not in cache[dest]:
                        problems.append(f"{s.where(REPO)}: link {target}: no heading of {dest.name} has "
                                        f"the anchor #{anchor}")
    return problems


# ---------------------------------------------------------------------------------------------- CLI

def cli_spec(app) -> dict[str, set[str]]:
    """Command name -> the options it accepts (both spellings of a boolean flag, and --help)."""
    group = typer.main.get_command(app) if isinstance(app, typer.Typer) else app
    assert hasattr(group, "commands"), f"expected a typer app or a click group, got {type(group)}"
    spec = {}
    for name, cmd in group.commands.items():
        opts = {"--help"}
        for p in cmd.params:
            if p.param_type_name == "option":
                opts.update(o for o in [*p.opts, *p.secondary_opts] if o.startswith("--"))
        spec[name] = opts
    return spec


def config_key_problem(key: str) -> str | None:
    """Why `key` (section.key[.sub...]) is not a params key of distill_pipe/config.py, or None."""
    sections = {f.name: t for f, t in zip(dataclasses.fields(config_mod.Config),
                                          typing.get_type_hints(config_mod.Config).values())
                if f.name not in ("source", "raw", "students")}
    train_keys = {f.name for f in dataclasses.fields(config_mod.TrainConfig)}
    parts = key.split(".")
    if parts[0] == "students":
        if len(parts) < 3 or parts[2] == "init":
            return None
        if parts[2] not in train_keys or len(parts) > 3:
            return f"{key}: a student entry takes `init` and the train keys ({', '.join(sorted(train_keys))})"
        return None
    if parts[0] not in sections:
        return f"{key}: no params section {parts[0]!r} (sections: {', '.join([*sections, 'students'])})"
    cls = sections[parts[0]]
    fields = {f.name: t for f, t in zip(dataclasses.fields(cls), typing.get_type_hints(cls).values())}
    if len(parts) < 2 or parts[1] not in fields:
        return f"{key}: {parts[0]} has no key {'.'.join(parts[1:])!r} (it has {', '.join(fields)})"
    if len(parts) > 2 and fields[parts[1]] is not dict:
        return f"{key}: {parts[0]}.{parts[1]} is not a mapping"
    return None


def _words(text: str, comments: bool) -> list[str]:
    text = text.replace("$(which distill-pipe)", "-m distill_pipe").replace("\\\n", " ")
    try:
        return shlex.split(text, comments=comments)
    except ValueError:  # unbalanced quotes in a prose-like span
        return text.split()


def simple_commands(text: str, comments: bool) -> list[list[str]]:
    """Split shell text on &&, ||, ; and a pipe (not a `[--a | --b]` alternative) into word lists."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        cmd: list[str] = []
        words = _words(line, comments)
        for i, w in enumerate(words):
            nxt = words[i + 1] if i + 1 < len(words) else ""
            if w in ("&&", "||", ";") or (w == "|" and not nxt.lstrip("[(").startswith("-")):
                out.append(cmd)
                cmd = []
            else:
                cmd.append(w.rstrip(";"))
        out.append(cmd)
    return [c for c in out if c]


def _flag(word: str) -> str | None:
    m = re.match(r"(--[A-Za-z][\w-]*)", word.strip("[]()'\"|,"))
    return m.group(1) if m else None


def _key_values(words: list[str], flag: str) -> list[str]:
    """The keys given with `flag KEY=V` or `flag=KEY=V`."""
    keys = []
    for i, w in enumerate(words):
        value = words[i + 1] if w == flag and i + 1 < len(words) else w[len(flag) + 1:] if w.startswith(flag + "=") else None
        if value is not None:
            keys.append(value.strip("'\"").partition("=")[0])
    return keys


SCRIPT_RE = re.compile(r"(?:benchmarks/)?([\w-]+\.(?:py|sh))")


def _bench_script(word: str, root: Path) -> Path | None:
    m = SCRIPT_RE.fullmatch(word)
    return root / "benchmarks" / m.group(1) if m and (root / "benchmarks" / m.group(1)).exists() else None


def _bench_flag_problems(words: list[str], script: Path) -> list[str]:
    have = set(re.findall(r"(--[A-Za-z][\w-]*)", script.read_text())) | {"--help"}
    return [f"benchmarks/{script.name} has no option {f}" for f in map(_flag, words) if f and f not in have]


def check_words(words: list[str], spec: dict[str, set[str]], root: Path = REPO, section_script: Path | None = None
                ) -> list[str]:
    """Problems of one simple command as the docs show it (empty when it is not ours to check).

    distill-pipe is the program when it is the first word (after any VAR=value), or `-m distill_pipe`; a bare
    option (`--overwrite`) is one of the CLI's, or of `section_script` when the docs section is about a
    benchmark script; `python benchmarks/x.py --flag`, or `x.py --flag`, names the script itself.
    """
    problems, keys = [], []
    first = next((i for i, w in enumerate(words) if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", w)), len(words))
    prog = first if words[first:first + 1] == ["distill-pipe"] else next(
        (i for i in range(1, len(words)) if words[i] == "distill_pipe" and words[i - 1] == "-m"), None)
    script = next((p for p in map(lambda w: _bench_script(w, root), words[first:first + 2]) if p), None)
    if prog is not None:
        if prog + 1 >= len(words) or words[prog + 1].startswith("-"):
            rest, cmd = words[prog + 1:], None
        else:
            cmd, rest = words[prog + 1], words[prog + 2:]
            if cmd not in spec:
                return [f"`distill-pipe {cmd}`: no such command (the CLI has {', '.join(spec)})"]
        allowed = spec[cmd] if cmd else {"--help"}
        problems += [f"`distill-pipe {cmd or ''}` has no option {f}" for f in map(_flag, rest) if f and f not in allowed]
        keys = _key_values(rest, "--set")
    elif first < len(words) and _flag(words[first]):  # a bare option: `--overwrite`, `--set data.seq_len=512`
        if section_script is not None:
            problems += _bench_flag_problems(words, section_script)
        else:
            every = set().union(*spec.values())
            problems += [f"no distill-pipe command has the option {f}" for f in map(_flag, words) if f and f not in every]
            keys = _key_values(words, "--set")
    elif words[first:first + 3] == ["dvc", "exp", "run"]:
        keys = _key_values(words, "-S") + _key_values(words, "--set-param")
    elif script is not None:
        problems += _bench_flag_problems(words[words.index(next(w for w in words if _bench_script(w, root))) + 1:],
                                         script)
    problems += [p for p in map(config_key_problem, keys) if p]
    return problems


def check_cli(files: list[Path], app, root: Path = REPO) -> list[str]:
    """Problems with the commands, options and params keys that the docs show in code."""
    spec = cli_spec(app)
    section_re = re.compile(r"(?:%s)\.[\w.]+" % "|".join(
        [f.name for f in dataclasses.fields(config_mod.Config) if f.name not in ("source", "raw")]))
    problems = []
    for path in files:
        for s in parse_markdown(path):
            if s.kind == "prose" or (s.kind == "block" and s.lang not in SHELL_LANGS):
                continue
            named = [p for p in map(lambda w: _bench_script(w, root), s.heading.replace("`", " ").split()) if p]
            found = [p for words in simple_commands(s.text, comments=s.kind == "block" and s.lang != "text")
                     for p in check_words(words, spec, root, named[0] if named else None)]
            if s.kind == "code":  # a params key named on its own: `train.loss_chunk_size`, `data.format: chat`
                m = section_re.fullmatch(re.split(r"\s*[=:]\s*|\s", s.text, maxsplit=1)[0])
                if m and m.group(0).rsplit(".", 1)[-1] not in FILE_ENDINGS:
                    found += [p for p in [config_key_problem(m.group(0))] if p]
            problems += [f"{s.where(root)}: {p}" for p in found]
    return problems


def check_docs(app, files: list[Path] | None = None, root: Path = REPO) -> list[str]:
    files = doc_files(root) if files is None else files
    return check_links(files) + check_cli(files, app, root)


# ---------------------------------------------------------------------------------------------- tests

def _app():
    from distill_pipe.cli import app

    return app


def test_docs_links_commands_flags_and_keys_are_real():
    problems = check_docs(_app())
    assert not problems, "\n".join(problems)


def _without_option(app, command: str, option: str):
    """A copy of the CLI in which `command` lacks `option`."""
    group = copy.deepcopy(typer.main.get_command(app))
    cmd = group.commands[command]
    before = len(cmd.params)
    cmd.params = [p for p in cmd.params if option not in getattr(p, "opts", [])]
    assert len(cmd.params) == before - 1, f"{command} has no option {option} to remove"
    return group


@pytest.mark.parametrize("command, option", [("teacher-logits", "--repair"), ("train", "--auto-resume"),
                                             ("inspect", "--verify"), ("prepare", "--set")])
def test_a_documented_option_removed_from_the_cli_is_reported(command, option):
    app = _app()
    assert check_cli(doc_files(), app) == []
    problems = check_cli(doc_files(), _without_option(app, command, option))
    assert any(f"`distill-pipe {command}` has no option {option}" in p for p in problems), problems
    assert all(option in p for p in problems), problems  # nothing else is blamed


def test_a_documented_command_removed_from_the_cli_is_reported():
    group = copy.deepcopy(typer.main.get_command(_app()))
    del group.commands["evaluate"]
    problems = check_cli(doc_files(), group)
    assert problems and all("`distill-pipe evaluate`: no such command" in p for p in problems), problems


def test_the_checker_reports_each_kind_of_drift(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "speed.py").write_text('p.add_argument("--steps")\n')
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## The `x` part — here\n")
    page = tmp_path / "README.md"
    page.write_text("\n".join([
        "# Title", "",
        "Good: [a](docs/other.md), [b](docs/other.md#the-x-part--here), [c](#title), [w](https://x.org/y#z),",
        "`distill-pipe train --student kd --resume`, `--set students.kd.alpha=0.8`, `train.loss_chunk_size`,",
        "`--set 'students.kd.init.from_teacher={layers: [0, 5]}'`, `teacher_logits.codec_params.temperature=1`,",
        "`speed.py --steps 3`, `distill_pipe/train.py`, `train.py`.", "",
        "Bad: [d](docs/gone.md), [e](docs/other.md#nowhere), [f](#nowhere), `distill-pipe tran`,",
        "`distill-pipe train --studnet kd`, `--overwrit`, `data.seqlen`, `students.kd.alhpa: 1`,",
        "`speed.py --stepz 3`.", "",
        "```bash",
        "torchrun --nproc_per_node=8 -m distill_pipe teacher-logits --repare  # --not-checked in a comment",
        "dvc exp run -S train.alpah=0.8 && distill-pipe evaluate --set nosection.key=1",
        "```", "",
        "```python",
        "distill-pipe --python-is-not-shell",
        "```",
    ]))
    problems = check_docs(_app(), [page], root=tmp_path)
    expected = ["docs/gone.md does not exist", "#nowhere", "#nowhere", "`distill-pipe tran`: no such command",
                "has no option --studnet", "no distill-pipe command has the option --overwrit", "data.seqlen",
                "students.kd.alhpa", "benchmarks/speed.py has no option --stepz",
                "`distill-pipe teacher-logits` has no option --repare", "train.alpah", "nosection.key"]
    text = "\n".join(problems)
    for fragment in expected:
        assert fragment in text, f"{fragment!r} not reported:\n{text}"
    assert len(problems) == len(expected), text


def test_github_slugs():
    seen: dict[str, int] = {}
    assert github_slug("### `distill-pipe train --student NAME [--resume | --auto-resume]`".lstrip("# "), seen) \
        == "distill-pipe-train---student-name---resume----auto-resume"
    assert github_slug("Codecs — `python benchmarks/codecs.py [--codecs dense-u8]`", seen) \
        == "codecs--python-benchmarkscodecspy---codecs-dense-u8"
    assert github_slug("The store's manifest", seen) == "the-stores-manifest"
    assert github_slug("The store's manifest", seen) == "the-stores-manifest-1"


def _config_fields():
    for section, cls in typing.get_type_hints(config_mod.Config).items():
        if section in ("students", "source", "raw"):
            continue
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            yield f"{section}.{f.name}", default


def _yaml_value(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else "{}" if v == {} else repr(v) \
        if not isinstance(v, str) else v


def test_params_page_lists_every_key_with_its_default_and_the_demos_value():
    text = (REPO / "docs" / "params.md").read_text(encoding="utf-8")
    rows = {k: (d, demo) for k, d, demo in re.findall(r"^\| `([\w.]+)` \| `([^`]*)` \| `([^`]*)` \|", text, flags=re.M)}
    params = config_mod._yaml((REPO / "params.yaml").read_text())
    want = {k: (_yaml_value(d), _yaml_value((params.get(k.split(".")[0]) or {}).get(k.split(".")[1], d)))
            for k, d in _config_fields()}
    missing = [f"| `{k}` | `{d}` | `{demo}` | ... |" for k, (d, demo) in want.items() if k not in rows]
    assert not missing, "docs/params.md lacks rows for:\n" + "\n".join(missing)
    wrong = [f"{k}: docs/params.md says default {rows[k][0]}, demo {rows[k][1]}; config.py and params.yaml say "
             f"{d}, {demo}" for k, (d, demo) in want.items() if rows[k] != (d, demo)]
    assert not wrong, "\n".join(wrong)
    assert set(rows) <= set(want), f"docs/params.md has rows for keys config.py lacks: {set(rows) - set(want)}"


def test_architecture_page_names_every_module():
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(distill_pipe/[\w/]+\.py)`", text))
    modules = {str(p.relative_to(REPO)) for p in (REPO / "distill_pipe").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert not modules - named, f"docs/architecture.md does not name {sorted(modules - named)}"
    assert not named - modules, f"docs/architecture.md names modules that do not exist: {sorted(named - modules)}"


def _ci_steps() -> list[str]:
    """.ci/run's commands, with `python -m pip` as `pip` and pip's -q dropped."""
    lines = [l.strip() for l in (REPO / ".ci" / "run").read_text().splitlines()]
    steps = [l for l in lines if l and not l.startswith(("#", "set ", "cd ", "export ", "git "))]
    steps = [re.sub(r"^python -m pip", "pip", s) for s in steps]
    return [s.replace(" -q ", " ") if s.startswith("pip ") else s for s in steps]


def test_readme_fits_a_screen_and_its_two_commands_are_what_ci_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300
    blocks = [s.text for s in parse_markdown(REPO / "README.md") if s.kind == "block"]
    commands = [l for l in blocks[0].splitlines() if l and not l.startswith("#")]
    assert len(commands) == 2, commands
    demo, tests = (c.split(" && ") for c in commands)
    ci = _ci_steps()
    assert tests == ci, f"README's test command {tests} is not what .ci/run runs {ci}"
    assert demo == [s.replace("'.[test]'", ".") for s in ci[:-1]] + ["dvc repro"], demo

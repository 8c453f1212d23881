"""Run Transformers' own Qwen3 / Qwen3-MoE model tests with every causal LM they build optimized by qwen3_accel.

    python scripts/hf_model_tests.py /path/to/transformers/tests qwen3 qwen3_moe            # optimized
    python scripts/hf_model_tests.py /path/to/transformers/tests qwen3 --no-optimize        # plain HF (baseline)
    python scripts/hf_model_tests.py TESTS qwen3 --json opt.json --baseline base.json -k generate

TESTS is the `tests` folder of a transformers checkout whose version matches the installed transformers (its
parent, the checkout root, must hold the conftest.py / src/ the tests import). The checkout is only read: nothing is
imported from it until pytest runs.

A pytest plugin (defined here, handed to `pytest.main(plugins=[...])`) wraps `Qwen3ForCausalLM` and
`Qwen3MoeForCausalLM` (and subclasses): a model built directly (`cls(config)`) is optimized right after its
`__init__`; one built by `from_pretrained` / `_from_config` (AutoModel*.from_config, from_pretrained) after that
returns (weights loaded). HF's model testers build their tiny configs with hidden_act="gelu", which optimize
refuses (Qwen3 is SiLU), so the plugin sets `hidden_act` on the configs they build (--hidden-act, default silu;
the baseline run gets the same). `qwen3_accel.optimize(model, compile=...)` refusing a model (meta device, sliding
window, a dtype mix, ...) leaves it as HF built it: the reason is logged and counted as "refused".

The summary gives passed / failed / error / skipped counts, the refusals, and every failure grouped by cause (the
first line of the exception). A RuntimeError "moved or converted after qwen3_accel.optimize" (a `.half()` / `.to(dtype)`
after optimize) is filed as "documented refusal: cast after optimize". With --baseline (the --json of a
--no-optimize run) failures that also fail without optimize are set apart.
"""

import argparse
import collections
import functools
import json
import os
import sys
import threading
import time

MODEL_TEST_FILES = {
    "qwen3": "models/qwen3/test_modeling_qwen3.py",
    "qwen3_moe": "models/qwen3_moe/test_modeling_qwen3_moe.py",
}
CAST_AFTER_OPTIMIZE = "moved or converted after qwen3_accel.optimize"
CAST_CATEGORY = "documented refusal: cast after optimize"


def _first_line(text: str, limit: int = 240) -> str:
    for line in str(text).splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return "<no message>"


class OptimizeEverythingPlugin:
    """pytest plugin: optimize every Qwen3 / Qwen3-MoE causal LM a test builds; record what happened per test."""

    def __init__(self, optimize: bool = True, compile: bool = False, verbose_refusals: bool = False,
                 hidden_act: str | None = "silu"):
        self.optimize = optimize
        self.compile = compile
        self.hidden_act = hidden_act  # forced on the configs the test classes' model testers build; None keeps theirs
        self.verbose_refusals = verbose_refusals
        self._local = threading.local()  # depth of from_pretrained/_from_config calls on this thread
        self._originals: list[tuple[type, str, object]] = []
        self.current: str | None = None  # node id of the running test
        self.outcomes: dict[str, str] = {}  # nodeid -> passed | failed | error | skipped
        self.errors: dict[str, str] = {}  # nodeid -> first line of the exception
        self.skip_reasons: dict[str, str] = {}
        self.optimized: collections.Counter = collections.Counter()  # nodeid -> models optimized
        self.refusals: dict[str, list[str]] = collections.defaultdict(list)  # nodeid -> refusal reasons
        self.durations: dict[str, float] = {}

    # ------------------------------------------------------------------ patching
    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def _optimize_built(self, model) -> None:
        import qwen3_accel

        if getattr(model, "qwen3_accel", None) is not None:
            return
        where = self.current or "<outside a test>"
        try:
            qwen3_accel.optimize(model, compile=self.compile)
        except (TypeError, ValueError, NotImplementedError) as exc:
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
            self.refusals[where].append(reason)
            if self.verbose_refusals:
                print(f"\n[hf_model_tests] optimize refused in {where}: {reason}", file=sys.stderr)
        else:
            self.optimized[where] += 1

    def install(self) -> None:
        if not self.optimize:
            return
        from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

        plugin = self
        for cls in (Qwen3ForCausalLM, Qwen3MoeForCausalLM):
            init = cls.__init__

            @functools.wraps(init)
            def __init__(self, *args, __init=init, **kwargs):
                __init(self, *args, **kwargs)
                # Not inside from_pretrained/_from_config (wrapped below: they optimize once the model is loaded).
                if plugin._depth() == 0:
                    plugin._optimize_built(self)

            self._originals.append((cls, "__init__", cls.__dict__["__init__"]))
            cls.__init__ = __init__

            for name in ("from_pretrained", "_from_config"):
                original = cls.__dict__.get(name)  # the classmethod object if defined on cls itself
                bound_func = getattr(cls, name).__func__

                def make(func):
                    @functools.wraps(func)
                    def wrapper(klass, *args, **kwargs):
                        plugin._local.depth = plugin._depth() + 1
                        try:
                            model = func(klass, *args, **kwargs)
                        finally:
                            plugin._local.depth -= 1
                        if plugin._depth() == 0 and isinstance(model, (Qwen3ForCausalLM, Qwen3MoeForCausalLM)):
                            plugin._optimize_built(model)
                        return model

                    return classmethod(wrapper)

                self._originals.append((cls, name, original))
                setattr(cls, name, make(bound_func))

    def uninstall(self) -> None:
        for cls, name, original in reversed(self._originals):
            if original is None:
                delattr(cls, name)
            else:
                setattr(cls, name, original)
        self._originals.clear()

    # ------------------------------------------------------------------ pytest hooks
    def pytest_configure(self, config):
        self.install()

    def pytest_unconfigure(self, config):
        self.uninstall()

    def pytest_collection_modifyitems(self, session, config, items):
        """HF's model testers build configs with hidden_act='gelu', which optimize refuses (Qwen3 is SiLU): give
        every tester's `get_config` the activation asked for (baseline runs get the same, so results compare)."""
        if self.hidden_act is None:
            return
        act = self.hidden_act
        seen = set()
        for item in items:
            tester = getattr(getattr(item, "cls", None), "model_tester_class", None)
            if tester is None or tester in seen or getattr(tester, "_hf_tests_act", None) == act:
                continue
            seen.add(tester)
            get_config = tester.get_config

            @functools.wraps(get_config)
            def patched(self, *args, __get_config=get_config, **kwargs):
                config = __get_config(self, *args, **kwargs)
                if hasattr(config, "hidden_act"):
                    config.hidden_act = act
                self.hidden_act = act
                return config

            tester.get_config = patched
            tester._hf_tests_act = act

    def pytest_runtest_logstart(self, nodeid, location):
        self.current = nodeid
        self._t0 = time.monotonic()

    def pytest_runtest_logfinish(self, nodeid, location):
        self.durations[nodeid] = time.monotonic() - getattr(self, "_t0", time.monotonic())
        self.current = None

    def _record(self, nodeid: str, outcome: str, message: str | None = None) -> None:
        rank = {"passed": 0, "skipped": 1, "error": 2, "failed": 3}
        previous = self.outcomes.get(nodeid)
        if previous is None or rank[outcome] > rank[previous]:
            self.outcomes[nodeid] = outcome
            if message is not None:
                self.errors[nodeid] = message

    def pytest_runtest_logreport(self, report):
        nodeid = report.nodeid
        subtest = type(report).__name__ == "SubtestReport"  # pytest >= 9: unittest subTest() / subtests fixture
        if subtest and not report.failed:
            return  # a passing or skipped subtest leaves the test's own outcome as it is
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skip_reasons.setdefault(nodeid, _first_line(reason, 160))
            self._record(nodeid, "skipped")
            return
        if report.failed:
            message = _first_line(getattr(report, "longreprtext", "") or str(report.longrepr))
            crash = getattr(report.longrepr, "reprcrash", None)
            if crash is not None and getattr(crash, "message", None):
                message = _first_line(crash.message)
            self._record(nodeid, "failed" if report.when == "call" else "error", message)
            return
        if report.when == "call":
            self._record(nodeid, "passed")

    # ------------------------------------------------------------------ results
    def results(self) -> dict:
        return {
            "optimize": self.optimize,
            "compile": self.compile,
            "hidden_act": self.hidden_act,
            "outcomes": self.outcomes,
            "errors": self.errors,
            "skip_reasons": self.skip_reasons,
            "optimized": dict(self.optimized),
            "refusals": dict(self.refusals),
        }


def categorize(message: str) -> str:
    if CAST_AFTER_OPTIMIZE in message:
        return CAST_CATEGORY
    return message


def print_summary(results: dict, baseline: dict | None, out=sys.stdout) -> None:
    outcomes = results["outcomes"]
    counts = collections.Counter(outcomes.values())
    refusal_events = sum(len(v) for v in results["refusals"].values())
    mode = "optimized" if results["optimize"] else "plain HF (no optimize)"
    if results["optimize"]:
        mode += f", compile={results['compile']}"
    mode += f", testers' hidden_act={results.get('hidden_act') or 'as the tests set it'}"
    print(f"\n==== hf_model_tests summary ({mode}) ====", file=out)
    print(
        f"tests: {len(outcomes)}  passed: {counts['passed']}  failed: {counts['failed']}  "
        f"error: {counts['error']}  skipped: {counts['skipped']}",
        file=out,
    )
    if results["optimize"]:
        print(
            f"models optimized: {sum(results['optimized'].values())} in {len(results['optimized'])} tests; "
            f"refused: {refusal_events} (in {len(results['refusals'])} tests)",
            file=out,
        )
        reasons = collections.Counter(r for rs in results["refusals"].values() for r in rs)
        for reason, n in reasons.most_common():
            print(f"  refused x{n}: {reason}", file=out)

    bad = {n: results["errors"].get(n, "<no message>") for n, o in outcomes.items() if o in ("failed", "error")}
    base_bad = set()
    if baseline is not None:
        base_bad = {n for n, o in baseline["outcomes"].items() if o in ("failed", "error")}
    groups: dict[str, dict[str, list[str]]] = {"new": collections.defaultdict(list),
                                              "also in baseline": collections.defaultdict(list)}
    for nodeid, message in sorted(bad.items()):
        which = "also in baseline" if nodeid in base_bad else "new"
        groups[which][categorize(message)].append(nodeid)
    for which, grouped in groups.items():
        if not grouped:
            continue
        title = "failures" if baseline is None else f"failures {which}"
        total = sum(len(v) for v in grouped.values())
        print(f"\n-- {title}: {total} in {len(grouped)} causes", file=out)
        for cause, nodeids in sorted(grouped.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            print(f"[{len(nodeids)}] {cause}", file=out)
            for nodeid in nodeids:
                extra = ""
                if results["optimize"]:
                    extra = f"  (optimized {results['optimized'].get(nodeid, 0)}"
                    if results["refusals"].get(nodeid):
                        extra += f", refused {len(results['refusals'][nodeid])}"
                    extra += ")"
                print(f"    {nodeid}{extra}", file=out)
    if baseline is not None:
        fixed = sorted(n for n in base_bad if outcomes.get(n) == "passed")
        if fixed:
            print(f"\n-- failing in baseline but passing here: {len(fixed)}", file=out)
            for nodeid in fixed:
                print(f"    {nodeid}", file=out)
        changed_skips = sorted(n for n, o in outcomes.items()
                               if o == "skipped" and baseline["outcomes"].get(n) not in (None, "skipped"))
        if changed_skips:
            print(f"\n-- skipped here but not in baseline: {len(changed_skips)}", file=out)
            for nodeid in changed_skips:
                print(f"    {nodeid}: {results['skip_reasons'].get(nodeid, '')}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run transformers' own Qwen3 / Qwen3-MoE model tests with qwen3_accel.optimize applied to every "
        "Qwen3ForCausalLM / Qwen3MoeForCausalLM they build, and summarize the failures by cause.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[1],
    )
    parser.add_argument("tests_dir", help="the tests/ folder of a transformers checkout matching the installed version")
    parser.add_argument("models", nargs="+", choices=sorted(MODEL_TEST_FILES), help="model test files to run")
    parser.add_argument("--compile", action="store_true", help="optimize with compile=True (default compile=False)")
    parser.add_argument("--no-optimize", action="store_true", help="plain HF: the baseline run (nothing patched)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument("--json", help="write the per-test results to this file")
    parser.add_argument("--baseline", help="a --json file of a --no-optimize run: set apart failures it shares")
    parser.add_argument("--hidden-act", default="silu",
                        help="activation forced on the configs HF's model testers build (they use 'gelu', which "
                        "optimize refuses); 'keep' leaves theirs (default: silu)")
    parser.add_argument("--verbose-refusals", action="store_true", help="print each refusal as it happens")
    parser.add_argument("--pytest-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for pytest (repeatable), e.g. --pytest-arg=-x")
    args = parser.parse_args(argv)

    json_path = os.path.abspath(args.json) if args.json else None  # before the chdir below
    tests_dir = os.path.abspath(args.tests_dir)
    root = os.path.dirname(tests_dir)
    files = [os.path.join(tests_dir, MODEL_TEST_FILES[m]) for m in args.models]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        parser.error(f"not found: {', '.join(missing)}")
    baseline = None
    if args.baseline:
        with open(args.baseline) as fh:
            baseline = json.load(fh)

    import pytest  # imported here so that --help needs nothing but the standard library

    plugin = OptimizeEverythingPlugin(
        optimize=not args.no_optimize, compile=args.compile, verbose_refusals=args.verbose_refusals,
        hidden_act=None if args.hidden_act == "keep" else args.hidden_act,
    )
    pytest_args = ["-q", "-p", "no:cacheprovider", "--rootdir", root, "-rN", "--disable-warnings", *files]
    if args.keyword:
        pytest_args += ["-k", args.keyword]
    pytest_args += args.pytest_arg
    os.chdir(root)  # HF's tests resolve some paths from the checkout root
    start = time.monotonic()
    code = pytest.main(pytest_args, plugins=[plugin])
    results = plugin.results()
    results["wall_s"] = round(time.monotonic() - start, 1)
    results["pytest_exit"] = int(code)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(results, fh, indent=1, sort_keys=True)
    print_summary(results, baseline)
    print(f"(pytest exit {int(code)}, {results['wall_s']} s)")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())

"""`teammesh workflow run` when things go wrong (issue 20, item 5).

* a cycle and an unknown dependency are refused before anything is submitted, with the
  steps named (node/cli/workflow.py, ``load_workflow``);
* a failed step fails the run and skips every step after it, directly or through another
  skipped step, while independent steps still run (``run_workflow``).
"""

from __future__ import annotations

import json
from pathlib import Path

from meshtools import mesh, run_cli


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bad_graphs_are_refused_before_anything_runs(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("1 2 3")
    cycle = _write(tmp_path / "cycle.toml", """
[steps.start]
kind = "hash.sha256"
input = "data.txt"

[steps.a]
kind = "base64.encode"
input_from = "c"

[steps.b]
kind = "base64.encode"
input_from = "a"

[steps.c]
kind = "base64.encode"
input_from = "b"
""")
    unknown = _write(tmp_path / "unknown.toml", """
[steps.digest]
kind = "hash.sha256"
input = "data.txt"

[steps.encode]
kind = "base64.encode"
input_from = "digest"
after = ["nowhere"]
""")
    with mesh(tmp_path, 1, slots=[1]) as (node,):
        proc = run_cli(node.home, "workflow", "run", str(cycle), check=False)
        assert proc.returncode == 1
        assert proc.stderr.startswith(f"error: {cycle}: steps form a cycle: a -> c -> b -> a")
        proc = run_cli(node.home, "workflow", "run", str(unknown), "--json", check=False)
        assert proc.returncode == 1
        assert proc.stderr.strip() == (f"error: {unknown}: step 'encode' depends on unknown"
                                       " ['nowhere']")
        assert proc.stdout == ""
        # neither submitted a step (the independent first steps included)
        assert node.cli("task", "list") == []


def test_a_failed_step_skips_its_dependants_and_the_rest_run(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("one two two")
    wf = _write(tmp_path / "wf.toml", """
[steps.bad]
kind = "hash.blake2b"
input = "data.txt"
params = { digest_size = 999 }

[steps.encode]
kind = "base64.encode"
input_from = "bad"

[steps.later]
kind = "np.stats"
params = { values = [1, 2, 3] }
after = ["encode"]

[steps.words]
kind = "text.stats"
input = "data.txt"

[steps.after_words]
kind = "base64.encode"
input_from = "words"
""")
    with mesh(tmp_path, 1, slots=[1]) as (node,):
        proc = run_cli(node.home, "workflow", "run", str(wf), "--json", check=False,
                       timeout=120)
        assert proc.returncode == 1, proc.stderr
        out = json.loads(proc.stdout)
        listed = {t["id"]: t for t in node.cli("task", "list")}
        human = run_cli(node.home, "workflow", "run", str(wf), check=False, timeout=120)
    steps = out["steps"]
    assert out["state"] == "failed"
    assert {n: s["state"] for n, s in steps.items()} == {
        "bad": "failed", "encode": "skipped", "later": "skipped", "words": "done",
        "after_words": "done"}
    assert "digest_size" in steps["bad"]["error"]
    for name in ("encode", "later"):  # later is skipped through encode
        assert steps[name]["error"] == "an earlier step failed"
        assert steps[name]["id"] is None
    assert steps["words"]["output"]["words"] == 3
    # only the steps that could run were submitted
    assert set(listed) == {steps[n]["id"] for n in ("bad", "words", "after_words")}
    assert listed[steps["bad"]["id"]]["state"] == "failed"
    # the table says the same to a person
    assert human.returncode == 1
    assert "skipped" in human.stdout
    assert "an earlier step failed" in human.stdout


def test_step_options_reach_the_submission(tmp_path: Path) -> None:
    """replicas, quorum and the other per-step options are passed to the task as given;
    a key the file format does not know is refused by name."""
    import pytest
    from teammesh.node.cli.workflow import load_workflow
    from teammesh.protocols.errors import TeammeshError

    wf = _write(tmp_path / "wf.toml", '[steps.vote]\nkind = "hash.sha256"\nreplicas = 3\n'
                'quorum = 2\npriority = 5\nno_cache = true\n')
    assert load_workflow(wf)["vote"].options == {"replicas": 3, "quorum": 2, "priority": 5,
                                                 "no_cache": True}
    bad = _write(tmp_path / "bad.toml", '[steps.vote]\nkind = "hash.sha256"\nquorom = 2\n')
    with pytest.raises(TeammeshError, match="quorom"):
        load_workflow(bad)

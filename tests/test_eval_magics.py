"""``%max_steer concepts``, ``--steer`` and ``--probe`` with a library concept, and
``%max_eval``, through the real IPython shell of tests/test_magics.py (embedded model as
big, the same model as small: the small one reads)."""
from __future__ import annotations

import pytest

from max_jupyter.evaluation.result import Evaluation
from test_magics import fails, run, session, shell  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


def test_concepts_steer_and_probe(shell, session, capsys):
    capsys.readouterr()
    run(shell, "%max_steer concepts")
    listing = capsys.readouterr().out
    assert listing.count("trained on first use") == 12 and listing.startswith("concise ")
    plain = run(shell, "%%max_generate -n 8 --judge none\nDescribe the sea.")
    steered = run(shell, "%%max_generate -n 8 --judge none --steer formal:0.4 --probe formal\nDescribe the sea.")
    assert steered.token_ids != plain.token_ids and set(steered.deltas) == {12, 13, 14, 15}
    assert steered.probe_scores["formal"].shape == (len(steered.token_ids),)
    run(shell, "%max_steer concepts")
    assert "formal       vs casual        12 pairs, 14+14 scoring texts, 40 prompts  trained\n" in \
        capsys.readouterr().out
    assert session.reader is session.small  # the probe read with the small model
    assert "no concept named 'formall' (did you mean 'formal'?)" in fails(
        shell, capsys, "%%max_generate -n 4 --probe formall\nDescribe the sea.")


def test_max_eval(shell, session, capsys):
    ev = run(shell, "%max_eval joy --prompts 6 --coefs 0.5 -n 8 -v ev")
    assert isinstance(ev, Evaluation) and shell.user_ns["ev"] is ev
    assert ev.coefs == [0.5] and len(ev.prompts) == 6 and len(ev.rows) == 3 * 6 + 2 * 3
    assert ev.reader == session.small.identity.describe()
    assert "--coefs" in fails(shell, capsys, "%max_eval joy --coefs 0:1:0")
    assert "concept=None" in fails(shell, capsys, "%max_eval happy")


def test_token_view_colours_by_a_probe(shell, session):
    import time

    from max_jupyter.jupyter.tokenview import TokenView

    handle = session.start("Describe the sea.", max_new_tokens=6, probes=["formal"], judges=[])
    view = TokenView(handle, session=session, judge="probe:formal")
    result = handle.result(timeout=300)
    deadline = time.monotonic() + 30
    while view.result is None and time.monotonic() < deadline:  # the pump thread ends the view
        time.sleep(0.05)
    shown = [row["scores"]["probe:formal"] for row in view._rows]
    assert shown == pytest.approx(result.probe_scores["formal"].tolist())
    view.close()

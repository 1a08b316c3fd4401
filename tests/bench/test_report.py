"""emit_report: a benchmark's JSON printed and written atomically to --out."""

from __future__ import annotations

import json

from celldit.bench import emit_report


def test_report_is_printed_and_written_and_replaces_an_old_file(tmp_path, capsys):
    out = tmp_path / "deep" / "result.json"
    text = emit_report({"b": [1, 2], "a": 0.5}, out, indent=1)
    assert capsys.readouterr().out == text + "\n"
    assert out.read_text() == text + "\n" and json.loads(out.read_text()) == {"b": [1, 2], "a": 0.5}
    emit_report({"run": 2}, out, echo=False)  # rewritten after a later stage
    assert capsys.readouterr().out == ""
    assert json.loads(out.read_text()) == {"run": 2}
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.json"]  # no temporary left


def test_report_without_out_only_prints_and_takes_a_default_for_odd_values(capsys, tmp_path):
    text = emit_report({"path": tmp_path}, None, default=str)
    assert json.loads(capsys.readouterr().out) == {"path": str(tmp_path)} and str(tmp_path) in text

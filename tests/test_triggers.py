"""Tests of the trigger grammar: what in a model answer runs an expert, and what is reported instead."""

from __future__ import annotations

import time

import pytest

from vila_m3.experts import DEFAULT_MAX_TRIGGERS, ExpertRegistry, find_triggers


@pytest.fixture(scope="module")
def registry() -> ExpertRegistry:
    return ExpertRegistry.from_config()


def _keys(scan):
    return [(t.name, t.argument) for t in scan.triggers]


def test_a_plain_trigger(registry):
    text = "This looks like a CT image. Let me trigger <VISTA3D(hepatic tumor)>. "
    scan = find_triggers(text, registry)
    assert _keys(scan) == [("VISTA3D", "hepatic tumor")]
    trigger = scan.triggers[0]
    assert trigger.raw == "<VISTA3D(hepatic tumor)>"
    assert text[trigger.span[0] : trigger.span[1]] == trigger.raw
    assert trigger.resolved.label_ids == (1, 26)
    assert not trigger.segmented_only and not scan.segmented_only
    assert scan.problems == []


@pytest.mark.parametrize("raw", ["<VISTA3D>", "<VISTA3D()>", "<VISTA3D( )>", "<VISTA3D(everything)>"])
def test_no_argument_means_everything(registry, raw):
    scan = find_triggers(f"Let me trigger {raw}.", registry)
    assert _keys(scan) == [("VISTA3D", "everything")]
    assert len(scan.triggers[0].resolved.label_ids) == 117


def test_brats_and_cxr_triggers(registry):
    scan = find_triggers(
        "This looks like an MRI image sequence. Let me first trigger <BRATS()>. And <CXR>, <CXR()>.", registry
    )
    assert _keys(scan) == [("BRATS", None), ("CXR", None)]
    assert scan.problems == []


def test_alias_runs_the_group_it_stands_for(registry):
    scan = find_triggers("Let me trigger <VISTA3D(hepatoma)>.", registry)
    assert _keys(scan) == [("VISTA3D", "hepatic tumor")]
    assert scan.triggers[0].raw == "<VISTA3D(hepatoma)>"


def test_identical_requests_run_once_in_order_of_first_appearance(registry):
    text = (
        "<VISTA3D(organs)> then <BRATS()> then <VISTA3D(organs)> and <VISTA3D(hepatoma)> "
        "and <VISTA3D(hepatic tumor)> and <VISTA3D> and <VISTA3D(everything)>"
    )
    scan = find_triggers(text, registry)
    assert _keys(scan) == [
        ("VISTA3D", "organs"),
        ("BRATS", None),
        ("VISTA3D", "hepatic tumor"),
        ("VISTA3D", "everything"),
    ]
    assert scan.triggers[0].span == (0, len("<VISTA3D(organs)>"))
    assert scan.triggers[2].raw == "<VISTA3D(hepatoma)>"


def test_segmented_only_answer(registry):
    scan = find_triggers("I segmented the entire image using <VISTA3D(everything)>.", registry)
    assert _keys(scan) == [("VISTA3D", "everything")]
    assert scan.triggers[0].segmented_only
    assert scan.segmented_only


def test_segmented_in_another_sentence_does_not_make_it_segmentation_only(registry):
    scan = find_triggers(
        "I have segmented the liver before. Now let me trigger <VISTA3D(hepatic tumor)>.", registry
    )
    assert not scan.triggers[0].segmented_only
    assert not scan.segmented_only


def test_one_trigger_that_wants_a_follow_up_keeps_the_follow_up(registry):
    text = "I segmented the organs using <VISTA3D(organs)>. Let me trigger <VISTA3D(hepatic tumor)>."
    scan = find_triggers(text, registry)
    assert [t.segmented_only for t in scan.triggers] == [True, False]
    assert not scan.segmented_only


def test_a_repeated_request_is_segmented_only_only_if_every_occurrence_is(registry):
    text = "Segmented with <VISTA3D(organs)>. Let me trigger <VISTA3D(organs)>."
    scan = find_triggers(text, registry)
    assert len(scan.triggers) == 1 and not scan.triggers[0].segmented_only


def test_no_trigger_is_not_segmented_only(registry):
    scan = find_triggers("I segmented nothing; the liver looks normal.", registry)
    assert scan.triggers == [] and scan.problems == [] and not scan.segmented_only


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Let me trigger <VISTA3D(hepatic tumor>.", "unbalanced brackets in '<VISTA3D(hepatic tumor>'"),
        ("Let me trigger <VISTA3D((x))>.", "nested brackets in '<VISTA3D((x))>'"),
        ("Let me trigger <VISTA3D(liver)).", "expected '>' after ')'"),
        ("Let me trigger <VISTA3D(hepatic\ntumor)>.", "a line break before ')'"),
        ("Let me trigger <VISTA3D(hepatic <b>tumor)>.", "'<' before ')'"),
        ("Let me trigger <VISTA3D(hepatic tumor", "'(' is never closed"),
        ("Let me trigger <VISTA3D (liver)>.", "expected '(' or '>' after VISTA3D"),
        ("Let me trigger <VISTA3D", "the answer ends before '>'"),
    ],
)
def test_malformed_triggers_are_reported_not_run(registry, text, expected):
    scan = find_triggers(text, registry)
    assert scan.triggers == []
    assert len(scan.problems) == 1
    assert expected in scan.problems[0]


def test_a_malformed_trigger_does_not_hide_a_good_one_after_it(registry):
    scan = find_triggers("<VISTA3D((x))> and then <VISTA3D(organs)>, <VISTA3D(skeleton>", registry)
    assert _keys(scan) == [("VISTA3D", "organs")]
    assert len(scan.problems) == 2
    assert "nested" in scan.problems[0] and "unbalanced" in scan.problems[1]


def test_unknown_expert_and_unknown_argument_are_problems(registry):
    text = "Let me trigger <TOTALSEG(liver)>, <VISTA3D(liver tumour)>, <vista3d(organs)> and <NAME(args)>."
    scan = find_triggers(text, registry)
    assert scan.triggers == []
    assert len(scan.problems) == 4
    assert "unknown expert 'TOTALSEG'" in scan.problems[0]
    assert "'liver tumour'" in scan.problems[1] and "valid arguments are" in scan.problems[1]
    assert "did you mean VISTA3D" in scan.problems[2]
    assert "unknown expert 'NAME'" in scan.problems[3]


def test_argument_to_an_expert_without_arguments_is_a_problem(registry):
    scan = find_triggers("Let me trigger <BRATS(tumor)> and <CXR(everything)>.", registry)
    assert scan.triggers == []
    assert "BRATS takes no argument" in scan.problems[0]
    assert "CXR takes no argument" in scan.problems[1]


def test_ordinary_angle_brackets_are_not_triggers_or_problems(registry):
    text = "If x < 3 and y > 2 then <image> shows <b>bold</b>, a <f(x)> formula and the <EOS> token."
    scan = find_triggers(text, registry)
    assert scan.triggers == [] and scan.problems == []


def test_unavailable_expert_is_a_problem_not_a_trigger():
    registry = ExpertRegistry.from_config(
        available=lambda s: "weights vista3d are not staged" if s.name == "VISTA3D" else None
    )
    scan = find_triggers("Let me trigger <VISTA3D(organs)> and <CXR()>.", registry)
    assert _keys(scan) == [("CXR", None)]
    assert scan.problems == [
        "expert VISTA3D in '<VISTA3D(organs)>' is not available: weights vista3d are not staged"
    ]


def test_expert_without_a_runner_is_a_problem(registry):
    scan = find_triggers("This is a cell image. Let me trigger <VISTA2D()>.", registry)
    assert scan.triggers == []
    assert scan.problems == ["expert VISTA2D in '<VISTA2D()>' is not run by this product"]


def test_fifty_triggers_are_capped(registry):
    groups = ["organs", "skeleton", "muscles", "cardiovascular", "gastrointestinal"]
    parts = [f"<VISTA3D({groups[i % 5]})>" for i in range(45)] + ["<BRATS()>"] * 5
    scan = find_triggers(" ".join(parts), registry)
    assert _keys(scan) == [("VISTA3D", g) for g in groups] + [("BRATS", None)]
    assert scan.problems == []

    many = " ".join(
        f"<VISTA3D({g})>"
        for g in ["everything", "hepatic tumor", "pancreatic tumor", "lung tumor", "bone lesion", *groups]
    )
    capped = find_triggers(many, registry)
    assert len(capped.triggers) == DEFAULT_MAX_TRIGGERS == 8
    assert len(capped.problems) == 1
    assert capped.problems[0].startswith("2 more expert request(s) not run (at most 8 per answer)")
    assert capped.problems[0].endswith("<VISTA3D(cardiovascular)>, <VISTA3D(gastrointestinal)>")
    assert [t.argument for t in find_triggers(many, registry, max_triggers=2).triggers] == [
        "everything",
        "hepatic tumor",
    ]
    assert len(find_triggers(many, registry, max_triggers=20).triggers) == 10
    with pytest.raises(ValueError):
        find_triggers(many, registry, max_triggers=-1)


def test_unicode_text_and_offsets(registry):
    text = "Das Bild zeigt eine Läsion 肝臓 🫁. Lass mich <VISTA3D(hepatic tumor)> auslösen. ＜VISTA3D（organs）＞"
    scan = find_triggers(text, registry)
    assert _keys(scan) == [("VISTA3D", "hepatic tumor")]
    start, end = scan.triggers[0].span
    assert text[start:end] == "<VISTA3D(hepatic tumor)>"
    assert (
        find_triggers("<VISTA3D(hépatic tumor)>", registry).problems[0].startswith("VISTA3D does not accept")
    )


@pytest.mark.parametrize(
    "filler",
    [
        "<VISTA3D(" * 20000,  # many unclosed openings
        "<" * 200000,
        "<VISTA3D((" + "a" * 200000,
        "<A" * 100000,
        "(" * 100000 + ")" * 100000,
        "<VISTA3D(a" + " a" * 100000 + ">",
    ],
)
def test_hostile_long_text_is_scanned_in_linear_time(registry, filler):
    text = filler + " Let me trigger <VISTA3D(organs)>."
    started = time.perf_counter()
    scan = find_triggers(text, registry)
    elapsed = time.perf_counter() - started
    assert ("VISTA3D", "organs") in _keys(scan)
    assert elapsed < 2.0, f"scan took {elapsed:.2f} s for {len(text)} characters"


def test_scan_time_grows_linearly(registry):
    unit = "The liver <is> fine (really). <VISTA3D(organs)> <VISTA3D(x <VISTA3D((y" * 10

    def timed(repeat: int) -> float:
        text = unit * repeat
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            find_triggers(text, registry)
            best = min(best, time.perf_counter() - started)
        return best

    small, large = timed(100), timed(800)
    assert large < small * 8 * 4 + 0.1  # 8x the text; a quadratic scan would take ~64x

"""Hand-checked cases for reward.py: the reference F1/EM, SQuAD metrics, answer extraction, format rule, reward."""

import pytest

from reward import (ANSWER_SPLIT, em, extract_answer, f1, format_ok, normalize, reward, split_golds, squad_em,
                    squad_f1)


def test_normalize_reference_rules():
    assert normalize("  The U.S.A.!  ") == "the u s a"          # punctuation -> space, articles kept
    assert normalize("Hello,\tworld\n") == "hello world"
    assert normalize("don't") == "don t"                         # apostrophe is ASCII punctuation
    assert normalize("“Paris”") == "“paris”"                     # unicode quotes are NOT in string.punctuation
    assert normalize("Türkiye") == "türkiye"
    assert normalize("...") == ""


def test_f1_is_over_word_sets():
    assert f1("Paris", "paris") == 1.0
    assert f1("the the paris", "the paris") == 1.0               # sets: repeated word counts once
    # pred {new, york, city}, gold {new, york}: P=2/3, R=1 -> F1 = 0.8
    assert f1("New York City", "New York") == pytest.approx(0.8)
    # articles kept: {the, beatles} vs {beatles}: P=1/2, R=1 -> 2/3
    assert f1("The Beatles", "Beatles") == pytest.approx(2 / 3)
    assert f1("U.S.A.", "u s a") == 1.0
    assert f1("“Paris”", "Paris") == 0.0                         # the reference does not strip unicode quotes


def test_f1_empty_and_multiple_golds():
    assert f1("", "paris") == 0.0
    assert f1("paris", "") == 0.0
    assert f1("!!!", "!!!") == 0.0                               # both normalise to nothing
    gold = f"London{ANSWER_SPLIT}Paris, France{ANSWER_SPLIT}"
    assert f1("paris", gold) == pytest.approx(2 / 3)             # best gold: {paris, france}
    assert f1("paris", ["London", "Paris"]) == 1.0               # a list of golds
    assert f1("paris", [f"London{ANSWER_SPLIT}Paris"]) == 1.0    # list items are split too
    assert split_golds("a<|answer_split|>b") == ["a", "b"]


def test_em():
    assert em("The Beatles.", "the beatles") == 1.0
    assert em("Beatles", "The Beatles") == 0.0                   # articles kept by the reference
    assert em("paris", f"london{ANSWER_SPLIT}Paris") == 1.0
    assert em("", f"paris{ANSWER_SPLIT}") == 0.0                 # an empty answer never matches


def test_squad_metrics():
    assert squad_em("Beatles", "The Beatles") == 1.0            # articles removed
    assert squad_em("U.S.A.", "usa") == 1.0                     # punctuation deleted, not spaced
    assert squad_f1("the the paris", "paris paris") == pytest.approx(2 / 3)  # bags: {paris:1} vs {paris:2}
    assert squad_f1("", "") == 1.0 and squad_f1("a", "paris") == 0.0
    assert squad_f1("paris", ["London", "Paris"]) == 1.0


def test_extract_answer():
    assert extract_answer("<think>x</think><answer> Paris </answer><answer>Rome</answer>") == "Paris"
    assert extract_answer("<ANSWER>Paris</Answer>") == "Paris"
    assert extract_answer("<answer>multi\nline</answer>") == "multi\nline"
    assert extract_answer("<answer>open only") is None
    assert extract_answer("<answer></answer>") == ""


def test_format_ok_balanced_and_ordered():
    assert format_ok(["<think>a</think><answer>b</answer>"]) == (True, "ok")
    assert format_ok(["<think>a</think><tool_call>{}</tool_call>", "<think>c</think><answer>b</answer>"])[0]
    assert format_ok(["<think>a</think><search>q</search>", "<answer>b</answer>"])[0]     # tags protocol
    assert format_ok(["<think>a</think>"]) == (False, "no answer")
    assert format_ok(["<think>a<answer>b</answer>"])[1] == "unbalanced <think> in turn 0"
    assert not format_ok(["</think>x<think><answer>b</answer>"])[0]                      # closing before opening
    assert not format_ok(["<search>q</search></search>", "<answer>b</answer>"])[0]
    assert not format_ok(["<browse>u", "<answer>b</answer>"])[0]
    # nested same tag: counts agree and every opening has a closing after it -> the reference accepts it
    assert format_ok(["<think><think>a</think></think><answer>b</answer>"])[0]
    # a tag opened in one turn and closed in the next is rejected (each turn is checked on its own)
    assert not format_ok(["<think>a", "</think><answer>b</answer>"])[0]
    assert format_ok("<think>a</think><answer>b</answer>")[0]                           # a single string


def test_reward_values():
    r = reward(["<think>a</think><answer>New York City</answer>"], "New York")
    assert r.format_ok and r.score == pytest.approx(0.8) and r.f1 == r.score and r.em == 0.0
    assert r.answer == "New York City" and r.reason == "ok"
    r = reward(["<answer>Paris</answer>"], ["Rome", "paris"])
    assert r.score == 1.0 and r.em == 1.0
    r = reward(["<think>no answer</think>"], "Paris")
    assert r.score == -1.0 and not r.format_ok and r.f1 == 0.0 and r.reason == "no answer"
    r = reward(["<think>a<answer>Paris</answer>"], "Paris")                            # right answer, bad format
    assert r.score == -1.0 and r.answer == "Paris"
    r = reward(["<answer></answer>"], "Paris")                                           # empty answer: F1 0, not -1
    assert r.score == 0.0 and r.format_ok


def test_tags_inside_observations_are_not_checked():
    # the trajectory's observation (web text) contains stray tags; only the policy's turns go to reward()
    turns = ["<think>look it up</think><search>capital of France</search>", "<think>ok</think><answer>Paris</answer>"]
    observation = "<result>Tutorial: close your </think> tags and write <answer> ... </result>"
    assert reward(turns, "Paris").score == 1.0
    # what the reference did (the whole rendered text) would have been a format error
    assert not format_ok([turns[0] + observation + turns[1]])[0]


def test_dr_protocol_requires_every_turn_to_close_think():
    """The reference appends <think> to every turn's prompt: a turn that never closes it makes the whole
    trajectory -1 under protocol dr, whether or not the loop forced the <think> into the turn's text."""
    good = ["<think>a</think><tool_call>{}</tool_call>", "<think>b</think><answer>Paris</answer>"]
    assert reward(good, "Paris", protocol="dr").score == 1.0
    no_close = ["<think>a</think><tool_call>{}</tool_call>", "<answer>Paris</answer>"]
    assert reward(no_close, "Paris").score == 1.0 and reward(no_close, "Paris", protocol="tags").score == 1.0
    r = reward(no_close, "Paris", protocol="dr")
    assert r.score == -1.0 and r.reason == "no </think> in turn 1"
    forced = ["<think>a</think><tool_call>{}</tool_call>", "<think>b <answer>Paris</answer>"]  # forced prefix kept
    assert reward(forced, "Paris", protocol="dr").score == -1.0
    assert format_ok(good, protocol="dr") == (True, "ok")


def test_dr_protocol_checks_only_the_reference_tags():
    """Under dr the reference's tags are checked (think, tool_call, answer); an unbalanced <search> in the text is
    not a format error there, as in the reference, but it is under our tags protocol, where it is a tool tag."""
    from reward import format_ok

    text = "<think>the page mentions a <search> box</think><answer>Paris</answer>"
    assert format_ok([text], protocol="dr") == (True, "ok")
    assert format_ok([text], protocol="tags")[0] is False

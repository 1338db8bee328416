"""Which sampled reasoning path the CoT builder keeps (`keye.data.cot.pick_path`), on real reply strings."""

from keye.data.cot import Question, analysis_choice, pick_path, question_of
from keye.data.sample import Message, TextPart
from keye.data.synthetic import generate


def q(answer="3", metric="exact", choice=None) -> Question:
    return Question("q", [Message("user", [TextPart("how many?")])], {}, answer, metric, choice)


def test_most_frequent_correct_path_wins_over_a_more_frequent_wrong_one():
    replies = ["<think>a</think><answer>4</answer>"] * 3 + ["<think>b</think><answer>3</answer>"] * 2 + \
              ["<think>c</think><answer>3</answer>"]
    assert pick_path(q(), replies, "think") == ("<think>b</think><answer>3</answer>", 2, 3)


def test_no_correct_path_and_no_thought_keep_nothing():
    assert pick_path(q(), ["<think>x</think><answer>4</answer>"], "think") is None
    assert pick_path(q(), ["<answer>3</answer>", "3"], "think") is None  # right, but no chain of thought
    assert pick_path(q(), ["3"], "think", require_thought=False) == ("3", 1, 1)


def test_metric_and_threshold_come_from_the_question():
    box = "<think>x</think><answer><|box_start|>[[10,10,50,50]]<|box_end|></answer>"
    assert pick_path(q([10, 10, 52, 50], "iou"), [box], "think") is not None  # IoU >= 0.5 is a hit
    assert pick_path(q([60, 60, 90, 90], "iou"), [box], "think") is None
    near = "<think>x</think><answer>blu</answer>"  # ANLS 0.75
    assert pick_path(q("blue", "anls"), [near], "think") is None
    assert pick_path(q("blue", "anls"), [near], "think", min_score=0.7) is not None


def test_auto_keeps_the_analysis_that_chose_well():
    direct = "<analysis>Simple. Therefore, /no_think mode is more appropriate.</analysis>3"
    thinking = "<analysis>Hard, so /think mode is more appropriate.</analysis><think>1 2 3</think><answer>3</answer>"
    assert analysis_choice(direct) == "no_think" and analysis_choice(thinking) == "think"
    assert analysis_choice("3") is None
    # unknown choice: the cheaper direct answer wins when it is right, even if thinking was sampled more
    assert pick_path(q(), [thinking, thinking, direct], "auto")[0] == direct
    assert pick_path(q(), [thinking, "<analysis>/no_think</analysis>4"], "auto")[0] == thinking
    # the data says thinking suits it: a right direct answer does not count
    assert pick_path(q(choice="think"), [direct, direct, thinking], "auto")[0] == thinking
    assert pick_path(q(choice="think"), [direct], "auto") is None
    assert pick_path(q(), ["3"], "auto") is None  # no analysis at all


def test_questions_from_samples():
    loaded = generate(3, tasks=["count"], mode_mix={"auto": 1.0})
    question = question_of(loaded)
    assert question.answer == loaded.sample.meta["answer"] and question.analysis_choice == "think"
    assert [m.role for m in question.messages] == ["user"] and question.media == loaded.media
    assert question_of(generate(0, tasks=["preference"])) == "not_a_question"
    rl = question_of(generate(0, tasks=["rl"]))
    assert rl.answer == generate(0, tasks=["rl"]).sample.reference_answer

import pytest

from medvl.eval.vqa_metrics import normalize_answer, token_f1, vqa_scores, yes_no


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  The Left  Kidney. ", "left kidney"),
        ("X-ray", "x ray"),
        ("t2-weighted", "t2 weighted"),
        ("3.5cm", "3.5cm"),
        ("Size: 3.5 cm.", "size 3.5 cm"),
        ("1,000 ml", "1000 ml"),
        ("One", "1"),
        ("zero", "0"),
        ("an abscess", "abscess"),
        ("Yes, it is!", "yes it is"),
        ("", ""),
        (4, "4"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [("Yes", "yes"), ("yes, it is", "yes"), ("True.", "yes"), ("No", "no"), ("none", "no"),
     ("not seen", "no"), ("maybe", None), ("left", None), ("", None), ("nothing", None)],
)
def test_yes_no(raw, expected):
    assert yes_no(raw) == expected


def test_token_f1_hand_computed():
    # gold {right, upper, lobe}, pred {right, lobe, lung, mass}: overlap 2 -> P 2/4, R 2/3, F1 = 4/7.
    assert token_f1("the right upper lobe", "right lobe lung mass") == pytest.approx(4 / 7)
    assert token_f1("", "") == 1.0
    assert token_f1("yes", "") == 0.0


def test_vqa_scores_hand_computed():
    answers = ["yes", "No", "left", "kitten", "right upper lobe"]
    predictions = ["Yes, there is.", "no", "left", "sitting", "right lobe"]
    types = ["CLOSED", "closed ", "Closed", "OPEN", "open"]
    s = vqa_scores(answers, predictions, types)

    assert (s["vqa_n"], s["vqa_n_closed"], s["vqa_n_open"], s["vqa_n_yes_no"]) == (5, 3, 2, 2)
    # Exact matches after normalisation: "no", "left".
    assert s["vqa_acc"] == pytest.approx(2 / 5)
    assert s["vqa_acc_closed"] == pytest.approx(2 / 3)
    assert s["vqa_acc_open"] == 0.0
    # yes/no: "yes there is" -> yes (right), "no" -> no (right); "left" is not a yes/no question.
    assert s["vqa_yes_no_acc"] == 1.0

    # Levenshtein: "yes" vs "yes there is" = 9 insertions over max length 12; kitten/sitting = 3 of 7;
    # "right upper lobe" vs "right lobe" = 6 deletions of 16.
    edit = [1 - 9 / 12, 1.0, 1.0, 1 - 3 / 7, 1 - 6 / 16]
    assert s["vqa_edit_sim"] == pytest.approx(sum(edit) / 5)
    assert s["vqa_edit_sim_closed"] == pytest.approx(sum(edit[:3]) / 3)
    assert s["vqa_edit_sim_open"] == pytest.approx(sum(edit[3:]) / 2)

    # Token F1: yes vs {yes, there, is} = 2*(1/3*1)/(1/3+1) = 0.5; kitten/sitting 0; upper lobe: P 1, R 2/3 -> 0.8.
    f1 = [0.5, 1.0, 1.0, 0.0, 0.8]
    assert s["vqa_token_f1"] == pytest.approx(sum(f1) / 5)
    assert s["vqa_token_f1_closed"] == pytest.approx(2.5 / 3)
    assert s["vqa_token_f1_open"] == pytest.approx(0.4)


def test_empty_group_keys_are_omitted():
    s = vqa_scores(["Axial"], ["axial"], ["open"])
    assert s["vqa_acc_open"] == 1.0 and s["vqa_n_closed"] == 0 and s["vqa_n_yes_no"] == 0
    assert not {"vqa_acc_closed", "vqa_edit_sim_closed", "vqa_token_f1_closed", "vqa_yes_no_acc"} & s.keys()


def test_unknown_answer_type_and_length_mismatch_rejected():
    with pytest.raises(ValueError, match="answer_type"):
        vqa_scores(["yes"], ["yes"], ["yes/no"])
    with pytest.raises(ValueError, match="lengths"):
        vqa_scores(["yes", "no"], ["yes"], ["closed", "closed"])

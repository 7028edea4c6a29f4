"""The synthetic chest films: determinism, ids, findings visible on the right side of the pixels, text = truth.

Pixel tests render the same seed with and without a finding: acquisition (positioning, exposure, noise) is drawn
before any finding, so the two films differ only where the finding was drawn. Patient LEFT is IMAGE RIGHT.
"""
import io
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from medvl.data.images import decode_image
from medvl.data.synthetic import (
    encode_gray_png,
    qa_pairs,
    render_study,
    sample_findings,
    synthetic_records,
    write_report,
)

SIZE = 128
SEEDS = range(6)
CHANGED = 30  # grey levels: far above the 8-bit rounding that separates two renders of one seed


def render(findings, seed):
    return np.asarray(render_study(findings, rng=np.random.default_rng(seed), image_size=SIZE)).astype(int)


def changed_pixels(findings, seed, sign=1):
    """Boolean mask of pixels a finding made brighter (sign=1) or darker (sign=-1) than the normal film."""
    return sign * (render(findings, seed) - render([], seed)) > CHANGED


def centroid(mask):
    rows, cols = np.nonzero(mask)
    return cols.mean() / SIZE, rows.mean() / SIZE  # (x, y) as fractions of the image, from the top-left


def fraction_on_image_right(mask):
    return mask[:, SIZE // 2 :].sum() / mask.sum()


def lung_field(image, image_right):
    """The dark lung field in one half of a normal film: dark pixels with body on both sides of them in their row
    (which leaves out the air over the shoulders and beside the arms), away from the trachea."""
    dark = image < (np.percentile(image, 10) + np.percentile(image, 90)) / 2
    body_on_left = np.maximum.accumulate(~dark, axis=1)
    body_on_right = np.maximum.accumulate(~dark[:, ::-1], axis=1)[:, ::-1]
    lung = dark & body_on_left & body_on_right
    lung[:, SIZE // 2 - SIZE // 16 : SIZE // 2 + SIZE // 16] = False
    lung[:, : SIZE // 2] &= not image_right
    lung[:, SIZE // 2 :] &= image_right
    return lung


def lung_centroid(image, image_right):
    return centroid(lung_field(image, image_right))


# ------------------------------------------------------------------------------------------- records


def test_same_seed_same_bytes_and_longer_runs_extend_shorter_ones():
    first = list(synthetic_records(6, seed=3))
    again = list(synthetic_records(6, seed=3))
    longer = list(synthetic_records(9, seed=3))
    other = list(synthetic_records(6, seed=4))
    assert [r.to_row() for r in first] == [r.to_row() for r in again]
    assert [r.to_row() for r in first] == [r.to_row() for r in longer[:6]]
    assert all(a.image != b.image for a, b in zip(first, other))


def test_ids_unique_and_patients_group_their_studies():
    records = list(synthetic_records(7, studies_per_patient=3))
    assert [r.id for r in records] == [f"syn-p{p:06d}-s{s}" for p, s in
                                       [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]]
    assert [r.group_id for r in records] == ["syn-p000000"] * 3 + ["syn-p000001"] * 3 + ["syn-p000002"]
    for record in records:
        assert record.split == "" and record.question == record.answer == record.answer_type == ""
        assert record.meta["patient_id"] == record.group_id and record.meta["study_id"] == record.id

    vqa = list(synthetic_records(7, studies_per_patient=3, task="vqa"))
    assert len({r.id for r in vqa}) == len(vqa)
    assert {r.id.rsplit("-q", 1)[0] for r in vqa} == {r.id for r in records}
    assert all(r.group_id == r.id.split("-s")[0] for r in vqa)


def test_images_are_pngs_of_the_requested_size_and_differ_between_a_patients_studies():
    records = list(synthetic_records(4, image_size=96))
    for record in records:
        assert record.image.startswith(b"\x89PNG")
        assert decode_image(record.image).size == (96, 96)
    assert records[0].image != records[1].image


def test_png_encoder_round_trips_exactly():
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 7), dtype=np.uint8)
    decoded = Image.open(io.BytesIO(encode_gray_png(pixels)))
    assert decoded.mode == "L" and np.array_equal(np.asarray(decoded), pixels)


def many_findings(count, seed):
    """Finding lists from the sampler the records use, without paying for the images."""
    return [sample_findings(np.random.default_rng([seed, i])) for i in range(count)]


def test_finding_mix_normal_about_a_quarter_and_every_finding_common():
    draws = many_findings(1000, seed=1)
    counts = Counter()
    for findings in draws:
        assert len(findings) <= 2 and len({f["name"] for f in findings}) == len(findings)
        counts["normal"] += not findings
        counts.update(f["name"] + ("-" + f["side"] if "side" in f else "") for f in findings)
        counts.update("zone-" + f["zone"] for f in findings if f["name"] == "nodule")
        sides = {f["name"]: f.get("side") for f in findings}
        assert sides.get("pleural_effusion", "x") != sides.get("pneumothorax", "y")  # never hide one another
        assert sides.get("nodule", "x") != sides.get("pneumothorax", "y")
    assert 0.18 < counts["normal"] / len(draws) < 0.32
    assert 0.18 < counts["cardiomegaly"] / len(draws) < 0.34
    for name in ("nodule", "pleural_effusion", "pneumothorax"):
        for side in ("left", "right"):
            assert counts[f"{name}-{side}"] / len(draws) > 0.07, (name, side, counts)
    assert all(counts[f"zone-{zone}"] > 100 for zone in ("upper", "lower"))


# -------------------------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("seed", SEEDS)
def test_effusion_is_white_at_the_base_of_its_own_side(seed):
    left = [{"name": "pleural_effusion", "side": "left"}]
    right = [{"name": "pleural_effusion", "side": "right"}]
    for findings, expected_fraction_right in ((left, 1.0), (right, 0.0)):
        brighter = changed_pixels(findings, seed)
        assert fraction_on_image_right(brighter) == pytest.approx(expected_fraction_right, abs=0.02)
        lung = lung_field(render([], seed), image_right=expected_fraction_right == 1.0)
        assert brighter[lung].mean() > 0.25  # a large effusion: over a quarter of the visible lung
        assert centroid(brighter)[1] > centroid(lung)[1] + 0.08  # the lung base, not the apex
        assert (render(findings, seed) - render([], seed))[brighter].mean() > 70  # dense white, not a haze

    # Same film, the effusion moved to the other side: the base it left is dark lung again.
    image_right_base, image_left_base = changed_pixels(left, seed), changed_pixels(right, seed)
    assert render(left, seed)[image_right_base].mean() > render(right, seed)[image_right_base].mean() + 60
    assert render(right, seed)[image_left_base].mean() > render(left, seed)[image_left_base].mean() + 60


@pytest.mark.parametrize("seed", SEEDS)
def test_effusion_meniscus_climbs_the_lateral_wall(seed):
    brighter = changed_pixels([{"name": "pleural_effusion", "side": "left"}], seed)
    columns = np.nonzero(brighter.any(axis=0))[0]
    top_row = {c: np.nonzero(brighter[:, c])[0].min() for c in columns}
    medial, lateral = columns[len(columns) // 5], columns[-len(columns) // 5]
    assert top_row[lateral] < top_row[medial] - 3


@pytest.mark.parametrize("seed", SEEDS)
def test_pneumothorax_is_a_large_black_apical_lateral_space_on_its_side(seed):
    for side, expected_fraction_right in (("left", 1.0), ("right", 0.0)):
        findings = [{"name": "pneumothorax", "side": side}]
        darker = changed_pixels(findings, seed, sign=-1)
        assert darker.sum() > 0.06 * SIZE * SIZE  # a large space, not a rim
        assert fraction_on_image_right(darker) == pytest.approx(expected_fraction_right, abs=0.02)
        # Apical and lateral: the lung falls back towards its hilum, so its upper outer quarter is all air.
        lung = lung_field(render([], seed), image_right=side == "left")
        lung_x, lung_y = centroid(lung)
        rows, columns = np.mgrid[:SIZE, :SIZE] / SIZE
        upper_outer = lung & (rows < lung_y) & ((columns > lung_x) if side == "left" else (columns < lung_x))
        assert darker[upper_outer].mean() > 0.8
        assert darker[lung].mean() > 0.6
        image = render(findings, seed)
        assert np.median(image[darker]) < 40  # black air


def heart_and_thorax_widths(image, rows):
    """Per row: the bright run through the midline (heart) and the span of the dark lungs either side of it."""
    hearts, thoraxes = [], []
    for row in image[rows]:
        dark = row < (np.percentile(row, 10) + np.percentile(row, 90)) / 2
        heart_left = np.nonzero(dark[: SIZE // 2])[0].max()  # last lung pixel before the heart
        heart_right = SIZE // 2 + np.nonzero(dark[SIZE // 2 :])[0].min()
        thorax_left = np.nonzero(~dark[:heart_left])[0].max()  # first chest-wall pixel beyond the lung
        thorax_right = heart_right + np.nonzero(~dark[heart_right:])[0].min()
        hearts.append(heart_right - heart_left - 1)
        thoraxes.append(thorax_right - thorax_left - 1)
    return np.median(hearts), np.median(thoraxes)


@pytest.mark.parametrize("seed", SEEDS)
def test_cardiomegaly_widens_the_heart_past_half_the_thorax(seed):
    enlarged = [{"name": "cardiomegaly"}]
    brighter = changed_pixels(enlarged, seed)
    rows = np.nonzero(brighter.sum(axis=1) > 4)[0]
    assert len(rows) > 10 and centroid(brighter)[1] > lung_centroid(render([], seed), True)[1]  # low in the chest
    normal_heart, normal_thorax = heart_and_thorax_widths(render([], seed), rows)
    large_heart, large_thorax = heart_and_thorax_widths(render(enlarged, seed), rows)
    assert large_heart > 1.25 * normal_heart
    assert normal_heart / normal_thorax < 0.5 < large_heart / large_thorax


@pytest.mark.parametrize("seed", SEEDS)
def test_nodule_is_a_large_bright_disc_in_its_zone(seed):
    centres = {}
    for side in ("right", "left"):
        for zone in ("upper", "lower"):
            brighter = changed_pixels([{"name": "nodule", "side": side, "zone": zone}], seed)
            assert brighter.sum() > np.pi * (0.07 * SIZE) ** 2  # radius >= 8.5 % of the width, less the soft rim
            centres[side, zone] = centroid(brighter)
    for zone in ("upper", "lower"):
        assert centres["right", zone][0] < 0.45 and centres["left", zone][0] > 0.55
    for side in ("right", "left"):
        assert centres[side, "upper"][1] + 0.25 < centres[side, "lower"][1]


def test_render_study_rejects_unknown_or_hiding_findings():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        render_study([{"name": "fracture"}], rng=rng, image_size=SIZE)
    with pytest.raises(ValueError):
        render_study([{"name": "nodule", "side": "left"}], rng=rng, image_size=SIZE)  # no zone
    with pytest.raises(ValueError):
        render_study([{"name": "pleural_effusion", "side": "left"}, {"name": "pneumothorax", "side": "left"}],
                     rng=rng, image_size=SIZE)


# ---------------------------------------------------------------------------------------------- text


def test_reports_are_the_templates():
    assert write_report([]) == ("The heart size is normal. The lungs are clear. "
                                "There is no pleural effusion or pneumothorax.")
    findings = [{"name": "pneumothorax", "side": "right"}, {"name": "cardiomegaly"},
                {"name": "nodule", "side": "left", "zone": "upper"}]
    assert write_report(findings[:2]) == ("The heart is enlarged. The lungs are clear. "
                                          "There is a right pneumothorax. There is no pleural effusion.")
    assert write_report([findings[0], findings[2]]) == ("The heart size is normal. There is a nodule in the left "
                                                        "upper zone. There is a right pneumothorax. "
                                                        "There is no pleural effusion.")
    assert write_report([{"name": "pleural_effusion", "side": "left"}]) == (
        "The heart size is normal. The lungs are clear. There is a left pleural effusion. There is no pneumothorax.")


def test_each_report_states_exactly_the_findings_in_meta():
    vocabulary = set()
    for finding_list in many_findings(300, seed=2):
        text, findings = write_report(finding_list), {f["name"]: f for f in finding_list}
        vocabulary.update(re.findall(r"[a-z]+", text.lower()))
        assert ("The heart is enlarged." in text) == ("cardiomegaly" in findings)
        assert ("The heart size is normal." in text) == ("cardiomegaly" not in findings)
        for name, phrase in (("pleural_effusion", "pleural effusion"), ("pneumothorax", "pneumothorax")):
            positive = re.findall(rf"There is an? (left|right) {phrase}\.", text)
            assert positive == ([findings[name]["side"]] if name in findings else [])
            assert (f"no {phrase}" in text or f"no pleural effusion or {phrase}" in text) == (name not in findings)
        nodules = re.findall(r"There is a nodule in the (left|right) (upper|lower) zone\.", text)
        assert nodules == ([(findings["nodule"]["side"], findings["nodule"]["zone"])] if "nodule" in findings else [])
        assert ("The lungs are clear." in text) == ("nodule" not in findings)
    assert len(vocabulary) <= 30  # small enough for a tiny captioner to learn


def test_the_projects_chexpert_labeler_reads_every_report_right():
    from medvl.eval.chexpert.labeler import CheXpertLabeler

    labeler = CheXpertLabeler()
    observations = {"cardiomegaly": "Cardiomegaly", "pleural_effusion": "Pleural Effusion",
                    "pneumothorax": "Pneumothorax", "nodule": "Lung Lesion"}
    reports = {write_report(findings): findings for findings in many_findings(2000, seed=3)}
    assert len(reports) == 29  # all the sampler allows: normal, 9 single findings, 19 compatible pairs
    for report, findings in reports.items():
        labels = labeler.label(report)
        names = {f["name"] for f in findings}
        for name, observation in observations.items():
            absent = None if name == "nodule" else 0.0  # "The lungs are clear." mentions no lesion
            assert labels[observation] == (1.0 if name in names else absent), (report, observation)
        assert labels["No Finding"] == (1.0 if not findings else None), report


def expected_answer(question, findings):
    """An independent reading of the questions, from meta alone."""
    by_name = {f["name"]: f for f in findings}
    yes_no = {True: "yes", False: "no"}
    name_of = {"pleural effusion": "pleural_effusion", "pneumothorax": "pneumothorax", "lung nodule": "nodule",
               "nodule": "nodule"}
    if match := re.fullmatch(r"Is there an? (pleural effusion|pneumothorax|lung nodule)\?", question):
        return yes_no[name_of[match[1]] in by_name]
    if match := re.fullmatch(r"Is there an? (pleural effusion|pneumothorax|nodule) (?:on the|in the) (left|right)"
                             r"(?: lung)?\?", question):
        return yes_no[by_name.get(name_of[match[1]], {}).get("side") == match[2]]
    if match := re.fullmatch(r"Which side is the (pleural effusion|pneumothorax) on\?", question):
        return by_name[name_of[match[1]]]["side"]
    if question == "Where is the nodule?":
        return f"{by_name['nodule']['side']} {by_name['nodule']['zone']} zone"
    if question == "Is the heart enlarged?":
        return yes_no["cardiomegaly" in by_name]
    if question == "Is the heart size normal?":
        return yes_no["cardiomegaly" not in by_name]
    if question == "Is this chest x-ray normal?":
        return yes_no[not findings]
    if question == "What is the size of the heart?":
        return "enlarged" if "cardiomegaly" in by_name else "normal"
    if question == "What is the main abnormality?":
        for name in ("pneumothorax", "pleural_effusion", "nodule", "cardiomegaly"):
            if name in by_name:
                return name.replace("_", " ")
        return "none"
    raise AssertionError(f"unexpected question {question!r}")


def test_vqa_records_answer_from_meta_with_the_report_as_text():
    records = list(synthetic_records(30, seed=5, task="vqa"))
    per_image = Counter(r.id.rsplit("-q", 1)[0] for r in records)
    assert len(per_image) == 30 and min(per_image.values()) >= 4 and max(per_image.values()) <= 6
    for record in records:
        assert record.answer == expected_answer(record.question, record.meta["findings"]), record
        assert record.text == write_report(record.meta["findings"])
        assert record.answer_type in ("closed", "open")


def test_vqa_answers_agree_with_the_findings_and_yes_no_is_balanced():
    answers = Counter()
    for i, findings in enumerate(many_findings(300, seed=6)):
        for question, answer, answer_type in qa_pairs(findings, np.random.default_rng(i)):
            assert answer == expected_answer(question, findings), (question, answer, findings)
            assert answer == answer.lower()
            assert (answer_type == "closed") == (answer in ("yes", "no"))
            answers[answer] += 1
    assert 0.4 < answers["yes"] / (answers["yes"] + answers["no"]) < 0.6
    assert min(answers["left"], answers["right"], answers["none"], answers["enlarged"]) > 30


def test_qa_pairs_for_a_normal_film():
    pairs = qa_pairs([], np.random.default_rng(0))
    closed = sorted(p for p in pairs if p[2] == "closed")
    assert [answer for _, answer, _ in closed].count("yes") == 2
    assert {q for q, answer, _ in closed if answer == "yes"} == {"Is the heart size normal?",
                                                                   "Is this chest x-ray normal?"}
    assert ("What is the main abnormality?", "none", "open") in pairs

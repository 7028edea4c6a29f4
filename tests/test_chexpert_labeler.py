"""The rule-based CheXpert labeler: one test per rule, then a hand-labelled set of reports in real phrasing.

Labels are by hand, CheXpert conventions (1.0 positive, -1.0 uncertain, 0.0 negative, unlisted = blank), and no
label was changed to match the labeler's output. Reports follow IU X-ray and MIMIC-CXR phrasing, with IU X-ray's
``XXXX`` de-identification tokens left in. ``LABELLED_REPORTS`` is three sets: the first (65) was written before the
labeler, but its rules were then developed with those sentences in view, so its score (micro-F1 1.0) is optimistic;
the second (47, MIMIC-CXR wording) was written and labelled after the first version of the labeler and scored before
any rule was changed for it: micro-F1 0.993 (one miss, "pulmonary vascularity is engorged" as Edema, kept); the
third (30, harder wording) was written blind later and scored 1.0 on its one run. One author wrote the rules and all
three sets, so expect less on other people's reports and labelling conventions.
"""
from __future__ import annotations

import csv
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from medvl.eval.chexpert import CE5, OBSERVATIONS, CheXpertLabeler
from medvl.eval.chexpert_csv import label_csv
from medvl.eval.clinical_metrics import clinical_efficacy

NF, ECM, CM, LL, LO, ED, CO, PN, AT, PX, PE, PO, FR, SD = OBSERVATIONS

# (report, {observation: label}); observations not listed are blank.
LABELLED_REPORTS: list[tuple[str, dict[str, float]]] = [
    ("The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.",
     {NF: 1.0, CM: 0.0, ECM: 0.0}),
    ("No pneumothorax or pleural effusion.", {NF: 1.0, PX: 0.0, PE: 0.0}),
    ("XXXX opacity in the right lower lobe may represent atelectasis or pneumonia.",
     {LO: 1.0, AT: -1.0, PN: -1.0}),
    ("Stable cardiomegaly. No focal consolidation, pleural effusion, or pneumothorax.",
     {CM: 1.0, CO: 0.0, PE: 0.0, PX: 0.0}),
    ("Sternotomy wires are noted. The heart size is within normal limits. No acute cardiopulmonary abnormality.",
     {NF: 1.0, SD: 1.0, CM: 0.0}),
    ("Degenerative changes of the spine. Lungs are clear. Heart size normal.", {CM: 0.0}),
    ("Calcified granuloma in the left upper lobe. No pneumothorax or pleural effusion. Normal heart size.",
     {PX: 0.0, PE: 0.0, CM: 0.0}),
    # Relabelled after the IU X-ray benchmark (benchmarks/labeler_agreement.py): a deformity is not a fracture,
    # "status post sternotomy" names a procedure, not a device, and blunting is not an effusion mention -- as in
    # the CheXpert labeler's own lists and in the IU indexers' codes.
    ("Chronic-appearing deformity of the right clavicle. The lungs are clear. No pleural effusion.", {PE: 0.0}),
    ("Left-sided PICC line tip in the SVC. No pneumothorax.", {NF: 1.0, SD: 1.0, PX: 0.0}),
    ("Low lung volumes with bibasilar atelectasis. No pleural effusion.", {AT: 1.0, PE: 0.0}),
    ("Hyperexpanded lungs consistent with emphysema. No focal airspace disease.", {LO: 0.0}),
    ("Without evidence of focal airspace disease, pleural effusion, or pneumothorax.",
     {NF: 1.0, LO: 0.0, PE: 0.0, PX: 0.0}),
    (("Mild cardiomegaly with pulmonary vascular congestion and mild interstitial edema. "
     "Small bilateral pleural effusions."), {CM: 1.0, ED: 1.0, PE: 1.0}),
    ("Blunting of the right costophrenic angle could be secondary to a small effusion versus scarring.",
     {PE: -1.0, LO: -1.0}),
    ("Cannot exclude pneumonia in the left lower lobe.", {PN: -1.0}),
    ("Heart size is upper limits of normal. Lungs are clear. No effusion.", {NF: 1.0, CM: 0.0, PE: 0.0}),
    (("Endotracheal tube terminates 4 cm above the carina. Nasogastric tube courses below the diaphragm. "
     "Right lower lobe consolidation concerning for pneumonia."), {SD: 1.0, CO: 1.0, PN: -1.0}),
    ("Interval resolution of the left pleural effusion. No pneumothorax.", {NF: 1.0, PE: 0.0, PX: 0.0}),
    ("Moderate right pneumothorax. Right chest tube in place.", {PX: 1.0, SD: 1.0}),
    (("The lungs are free of focal airspace disease. No pleural effusion or pneumothorax is seen. "
     "Heart size is normal."), {NF: 1.0, LO: 0.0, PE: 0.0, PX: 0.0, CM: 0.0}),
    ("Negative for acute cardiopulmonary process.", {NF: 1.0}),
    ("Questionable small left pleural effusion.", {PE: -1.0}),
    ("Findings suggest mild pulmonary edema.", {ED: -1.0}),
    ("There is a 1.5 cm nodule in the right upper lobe, possibly a neoplasm.", {LL: 1.0}),
    ("Patchy opacity at the left base, likely atelectasis, although infection is not excluded.",
     {LO: 1.0, AT: -1.0, PN: -1.0}),
    ("Left basilar opacity has resolved. Heart size remains enlarged.", {LO: 0.0, CM: 1.0}),
    ("No acute fracture. Mild degenerative changes of the thoracic spine.", {FR: 0.0}),
    ("Healed right rib fractures.", {FR: 1.0}),
    ("Dual-chamber pacemaker with leads in the right atrium and right ventricle. Normal heart size.",
     {NF: 1.0, SD: 1.0, CM: 0.0}),
    ("Enlarged cardiomediastinal silhouette. Mild pulmonary edema.", {ECM: 1.0, ED: 1.0}),
    ("Widened mediastinum. Recommend CT.", {ECM: 1.0}),
    ("Left upper lobe mass. Small left pleural effusion.", {LL: 1.0, PE: 1.0}),
    ("Pleural thickening at the right apex. No pneumothorax.", {PO: 1.0, PX: 0.0}),
    ("There is a small pericardial effusion. No pleural effusion.", {PE: 0.0}),
    ("Plate-like atelectasis in the left lung base.", {AT: 1.0}),
    ("Heart is mildly enlarged. Tortuous aorta.", {CM: 1.0}),
    ("Right IJ central venous catheter tip in the mid SVC. Lungs are clear. No pneumothorax.",
     {NF: 1.0, SD: 1.0, PX: 0.0}),
    ("Diffuse bilateral interstitial opacities, which may represent edema or atypical infection.",
     {LO: 1.0, ED: -1.0, PN: -1.0}),
    ("No evidence of pneumonia. Stable appearance of left-sided chest tube.", {PN: 0.0, SD: 1.0, NF: 1.0}),
    (("The cardiomediastinal silhouette and pulmonary vasculature are within normal limits. "
     "There is no pneumothorax or large pleural effusion."), {NF: 1.0, ECM: 0.0, PX: 0.0, PE: 0.0}),
    ("Large hiatal hernia. Otherwise, no acute abnormality.", {}),
    ("Lungs are hyperinflated. Biapical pleural-parenchymal scarring.", {PO: 1.0}),
    ("Right lower lobe pneumonia.", {PN: 1.0}),
    ("Interval improvement in left lower lobe consolidation.", {CO: 1.0}),
    ("Mild vascular congestion without frank edema.", {ED: -1.0}),
    ("There is no focal consolidation. There is no pneumothorax. The heart is not enlarged.",
     {NF: 1.0, CO: 0.0, PX: 0.0, CM: 0.0}),
    (("Compared to prior, there is increased opacification of the left lung base, which could be due to "
     "atelectasis, aspiration or pneumonia."), {LO: 1.0, AT: -1.0, PN: -1.0}),
    ("Normal chest x-XXXX.", {NF: 1.0}),
    ("Tiny left apical pneumothorax is unchanged.", {PX: 1.0}),
    ("No change in moderate cardiomegaly.", {CM: 1.0}),
    ("Mild bibasilar atelectasis. No evidence of pneumothorax. Degenerative changes in the thoracic spine.",
     {AT: 1.0, PX: 0.0}),
    ("Feeding tube tip in the stomach. Left lower lobe collapse.", {SD: 1.0, AT: 1.0}),
    ("Emphysema. No acute infiltrate.", {LO: 0.0}),
    (("The lungs are clear bilaterally. Specifically, no evidence of focal consolidation, pneumothorax, or "
     "pleural effusion. Cardiomediastinal silhouette is unremarkable. Imaged osseous structures are intact."),
     {NF: 1.0, CO: 0.0, PX: 0.0, PE: 0.0, ECM: 0.0}),
    (("Cardiomegaly is stable. There is a small right pleural effusion and right basilar atelectasis. "
     "Pneumonia cannot be excluded."), {CM: 1.0, PE: 1.0, AT: 1.0, PN: -1.0}),
    ("Interval removal of the endotracheal tube. No pneumothorax.", {NF: 1.0, SD: 0.0, PX: 0.0}),
    ("Severe scoliosis. Otherwise unremarkable chest.", {}),
    ("Possible right middle lobe infiltrate.", {LO: -1.0}),
    ("Bilateral pulmonary nodules are again seen, consistent with metastatic disease.", {LL: 1.0}),
    ("Stable calcified granulomas. No suspicious pulmonary nodules.", {LL: 0.0}),
    ("Heart size is borderline enlarged.", {CM: -1.0}),
    ("No displaced rib fractures are identified, but there is a new small left pneumothorax.",
     {FR: 0.0, PX: 1.0}),
    ("AICD in place. Lungs are clear.", {NF: 1.0, SD: 1.0}),
    (("FINDINGS: PA and lateral views of the chest. Heart size is moderately enlarged. There is mild "
     "pulmonary edema with small bilateral pleural effusions.\nIMPRESSION: Findings consistent with "
     "congestive heart failure."), {CM: 1.0, ED: 1.0, PE: 1.0}),
    (("INDICATION: Fever, evaluate for pneumonia.\nFINDINGS: The lungs are clear. No pleural effusion or "
     "pneumothorax. Cardiomediastinal silhouette is normal."), {NF: 1.0, PE: 0.0, PX: 0.0, ECM: 0.0}),
    # Second set: written after the first version of the labeler, scored before any rule was changed for it.
    (("PA and lateral views of the chest provided. There is no focal consolidation, effusion, or pneumothorax. "
     "The cardiomediastinal silhouette is normal. Imaged osseous structures are intact. No free air below the "
     "right hemidiaphragm is seen."), {NF: 1.0, CO: 0.0, PE: 0.0, PX: 0.0, ECM: 0.0}),
    (("Moderate to severe cardiomegaly is unchanged. Mild pulmonary vascular congestion has improved. Small "
     "bilateral pleural effusions are similar. Left retrocardiac opacity likely reflects atelectasis."),
     {CM: 1.0, ED: -1.0, PE: 1.0, LO: 1.0, AT: -1.0}),
    (("Endotracheal tube tip is 5 cm above the carina. Enteric tube passes below the diaphragm with the tip out of "
     "view. Right internal jugular line ends in the mid SVC. Lungs are low in volume with bibasilar opacities, "
     "likely atelectasis. No large pleural effusion or pneumothorax."),
     {SD: 1.0, LO: 1.0, AT: -1.0, PE: 0.0, PX: 0.0}),
    (("Heart size is normal. Hilar and mediastinal contours are within normal limits. There is no pulmonary edema. "
     "Minimal atelectasis is noted in the left lung base. No pleural effusion or pneumothorax is present."),
     {CM: 0.0, ECM: 0.0, ED: 0.0, AT: 1.0, PE: 0.0, PX: 0.0}),
    (("Compared to the prior study, there has been interval increase in the right pleural effusion, now moderate "
     "in size, with adjacent compressive atelectasis. Left lung is clear. No pneumothorax."),
     {PE: 1.0, AT: 1.0, PX: 0.0}),
    ("Multifocal patchy opacities in both lungs, concerning for multifocal pneumonia.", {LO: 1.0, PN: -1.0}),
    (("Lungs are well expanded and clear. Cardiomediastinal and hilar contours are unremarkable. No pleural "
     "abnormality."), {NF: 1.0, ECM: 0.0}),
    (("There is a left-sided dual lead pacemaker with leads terminating in the right atrium and right ventricle. "
     "Heart size is top normal. No acute osseous abnormalities."), {SD: 1.0, CM: 0.0, NF: 1.0}),
    ("Status post median sternotomy and CABG. Stable mild cardiomegaly. No evidence of pneumonia or edema.",
     {CM: 1.0, PN: 0.0, ED: 0.0}),  # relabelled: see the deformity report above
    ("Right upper lobe opacity is new, worrisome for pneumonia in the appropriate clinical setting.",
     {LO: 1.0, PN: -1.0}),
    ("Large right pneumothorax with leftward mediastinal shift.", {PX: 1.0}),
    ("Small left apical pneumothorax is slightly smaller than on the prior exam. Left chest tube remains in place.",
     {PX: 1.0, SD: 1.0}),
    ("Mild interstitial edema. Trace bilateral pleural effusions.", {ED: 1.0, PE: 1.0}),
    ("No radiographic evidence of acute cardiopulmonary disease.", {NF: 1.0}),
    (("Nodular opacity projecting over the left lower lung, which could represent a nipple shadow; repeat "
     "radiograph with nipple markers is recommended."), {LL: -1.0, LO: -1.0}),
    ("Bilateral hilar lymphadenopathy. Lungs are otherwise clear.", {}),
    ("The lungs are hyperinflated with flattening of the diaphragms, consistent with COPD. No focal consolidation.",
     {CO: 0.0}),
    ("There is a displaced fracture of the right seventh posterior rib.", {FR: 1.0}),
    ("Old healed left-sided rib fractures are again seen.", {FR: 1.0}),
    ("Cardiac silhouette is enlarged. Pulmonary vascularity is engorged. There are small bilateral effusions.",
     {CM: 1.0, ED: -1.0, PE: 1.0}),
    ("No acute intrathoracic process.", {NF: 1.0}),
    ("Patchy airspace opacity in the right lower lobe could reflect aspiration or pneumonia.", {LO: 1.0, PN: -1.0}),
    ("Interval removal of the right chest tube. There is a tiny residual right apical pneumothorax.",
     {SD: 0.0, PX: 1.0}),
    ("Nasogastric tube has been removed. Endotracheal tube remains in standard position.", {SD: 1.0, NF: 1.0}),
    (("Subtle opacity at the right base may be due to overlying soft tissue, though early pneumonia is not "
     "entirely excluded."), {LO: -1.0, PN: -1.0}),
    ("Mild pulmonary edema has resolved. Heart size remains mildly enlarged.", {ED: 0.0, CM: 1.0}),
    (("Lung volumes are low. There is crowding of the bronchovascular markings without focal consolidation. Heart "
     "size is difficult to assess."), {CO: 0.0}),  # relabelled: low volumes are a finding (IU indexers code them)
    ("Widening of the mediastinum is concerning for aortic injury; CT is recommended.", {ECM: 1.0}),
    (("There are diffuse bilateral alveolar opacities with air bronchograms, compatible with ARDS or pulmonary "
     "edema."), {LO: 1.0, ED: -1.0}),
    ("Elevated right hemidiaphragm with overlying atelectasis.", {AT: 1.0}),
    ("No definite pneumothorax is seen on this supine radiograph.", {PX: 0.0, NF: 1.0}),
    ("Previously seen left lower lobe consolidation has nearly resolved.", {CO: 0.0, NF: 1.0}),
    ("Port-a-cath with tip in the cavoatrial junction. Surgical clips in the right upper quadrant.",
     {SD: 1.0, NF: 1.0}),
    ("Persistent right middle lobe collapse.", {AT: 1.0}),
    ("Heart size is normal. There is a 2 cm mass in the left hilum. No pleural effusion.",
     {CM: 0.0, LL: 1.0, PE: 0.0}),
    ("The lungs are clear without consolidation or edema. There is no blunting of the costophrenic angles.",
     {NF: 1.0, CO: 0.0, ED: 0.0}),  # relabelled: see the deformity report above
    (("Slight increase in the size of the moderate left pleural effusion with associated atelectasis; underlying "
     "consolidation cannot be excluded."), {PE: 1.0, AT: 1.0, CO: -1.0}),
    ("Minimally displaced fracture of the left clavicle.", {FR: 1.0}),
    ("There is new mild pulmonary vascular congestion without overt edema. Cardiomegaly is re-demonstrated.",
     {ED: -1.0, CM: 1.0}),
    ("Stable appearance of the chest with no acute findings.", {NF: 1.0}),
    (("Lungs are clear. There is no pleural effusion. The heart is normal in size. Mediastinal contours are "
     "normal. There is a tortuous aorta."), {CM: 0.0, PE: 0.0, ECM: 0.0}),
    ("Right lower lobe pneumonia has improved but not completely resolved.", {PN: 1.0}),
    ("No pneumothorax. Small right effusion, unchanged. Right PICC in place.", {PX: 0.0, PE: 1.0, SD: 1.0}),
    (("Since the prior study, the left pleural effusion has decreased in size and the left lower lobe atelectasis "
     "has improved."), {PE: 1.0, AT: 1.0}),
    ("Findings are suggestive of early congestive heart failure.", {ED: -1.0}),
    (("Slightly increased opacification in the left lower lobe may reflect worsening atelectasis, although "
     "superimposed infection cannot be excluded."), {LO: 1.0, AT: -1.0, PN: -1.0}),
    (("Right-sided Port-A-Cath terminates in the right atrium. Lungs are clear. No pneumothorax or pleural "
     "effusion. Osseous structures demonstrate degenerative change."), {SD: 1.0, PX: 0.0, PE: 0.0}),
    # Third set: written blind after the speed work, scored once with no rule changed.
    (("Interval placement of a left-sided chest tube with near complete re-expansion of the left lung. Small "
     "residual left apical pneumothorax."),
     {SD: 1.0, PX: 1.0}),
    ("The patient is rotated. Allowing for this, the heart size is likely normal.", {CM: 0.0, NF: 1.0}),
    ("Bronchiectasis and scarring in the left lower lobe are unchanged.", {LO: 1.0}),
    (("There is mild blunting of the right costophrenic angle which may reflect a trace effusion or pleural "
     "thickening."),
     {PE: -1.0, PO: -1.0}),
    ("Biapical pleural thickening is noted, unchanged.", {PO: 1.0}),
    ("No evidence of free air.", {NF: 1.0}),
    ("Severe cardiomegaly with a left ventricular assist device in place.", {CM: 1.0, SD: 1.0}),
    ("Perihilar haziness and vascular indistinctness suggest mild interstitial edema.", {ED: -1.0}),
    (("There is new consolidation in the left lower lobe, compatible with pneumonia in the appropriate clinical"
     " setting."),
     {CO: 1.0, PN: -1.0}),
    ("Multiple bilateral rib fractures, some of which are new.", {FR: 1.0}),
    ("Lungs are clear. No pneumothorax. Mild thoracic kyphosis.", {PX: 0.0}),
    ("Stable small right pleural effusion. Otherwise no change.", {PE: 1.0}),
    ("Heart size normal. No consolidation. Findings discussed with the referring physician.",
     {NF: 1.0, CM: 0.0, CO: 0.0}),
    ("Pulmonary vasculature is normal. No edema.", {NF: 1.0, ED: 0.0}),
    ("Airspace opacities in the right upper lobe have improved but persist.", {LO: 1.0}),
    ("There is a rounded density in the left perihilar region which may represent a mass; CT recommended.", {LL: -1.0}),
    ("Pacemaker generator overlies the left chest with leads in expected position. Heart is normal in size.",
     {SD: 1.0, CM: 0.0, NF: 1.0}),
    ("Pneumothorax has increased in size.", {PX: 1.0}),
    ("Small bilateral pleural effusions are decreasing.", {PE: 1.0}),
    ("No evidence of acute disease. Old granulomatous disease.", {}),
    ("The endotracheal tube was removed. Lungs show mild bibasilar atelectasis.", {SD: 0.0, AT: 1.0}),
    (("ET tube 3 cm above carina. OG tube in stomach. Bilateral perihilar opacities consistent with pulmonary "
     "edema."),
     {SD: 1.0, LO: 1.0, ED: 1.0}),
    ("Nodular opacity in the right lower lobe is unchanged since prior, likely a benign granuloma.",
     {LL: 1.0, LO: 1.0}),
    ("Emphysematous changes. No pleural effusion or pneumothorax. Heart size is normal.", {PE: 0.0, PX: 0.0, CM: 0.0}),
    ("Cardiomediastinal silhouette is widened, likely due to AP technique and low lung volumes.", {ECM: -1.0}),
    ("No significant pleural effusions.", {NF: 1.0, PE: 0.0}),
    (("Right-sided chest tube is in place. There is no pneumothorax. Subcutaneous emphysema in the right chest "
     "wall."),
     {SD: 1.0, PX: 0.0}),
    ("Lungs are clear with no focal opacity concerning for pneumonia.", {NF: 1.0, LO: 0.0, PN: 0.0}),
    ("Moderate pulmonary edema is slightly improved, and small bilateral pleural effusions are unchanged.",
     {ED: 1.0, PE: 1.0}),
    (("Probable small left pleural effusion. Left basilar opacity, likely atelectasis, though pneumonia is "
     "possible."),
     {PE: -1.0, LO: 1.0, AT: -1.0, PN: -1.0}),
]


@pytest.fixture(scope="module")
def labeler() -> CheXpertLabeler:
    return CheXpertLabeler()


def expected_row(labels: dict[str, float]) -> dict[str, float | None]:
    return {name: labels.get(name) for name in OBSERVATIONS}


def test_observation_order_matches_the_chexpert_labeler():
    assert OBSERVATIONS[0] == "No Finding" and OBSERVATIONS[-1] == "Support Devices" and len(OBSERVATIONS) == 14
    assert CE5 == ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")


def test_mention_is_positive(labeler):
    out = labeler.label("Small left pleural effusion.")
    assert out[PE] == 1.0 and out[NF] is None and out[PX] is None


def test_negation(labeler):
    assert labeler.label("No pleural effusion.")[PE] == 0.0
    assert labeler.label("The pneumothorax has resolved.")[PX] == 0.0
    assert labeler.label("Lungs are free of consolidation.")[CO] == 0.0
    assert labeler.label("Negative for pneumonia.")[PN] == 0.0


def test_negated_list_negates_every_item(labeler):
    out = labeler.label("Without evidence of focal airspace disease, pleural effusion, or pneumothorax.")
    assert (out[LO], out[PE], out[PX], out[NF]) == (0.0, 0.0, 0.0, 1.0)


def test_negation_scope_ends_at_but(labeler):
    out = labeler.label("No pleural effusion, but there is a small right pneumothorax.")
    assert (out[PE], out[PX]) == (0.0, 1.0)


def test_normal_heart_size_is_negative_cardiomegaly(labeler):
    for text in ("Normal heart size.", "Heart size is within normal limits.", "The heart is normal in size.",
                 "The heart is not enlarged."):
        assert labeler.label(text)[CM] == 0.0, text
    assert labeler.label("The heart is enlarged.")[CM] == 1.0


def test_heart_without_a_size_statement_is_not_a_mention(labeler):
    assert labeler.label("Pacemaker leads project over the heart.")[CM] is None


def test_uncertainty(labeler):
    assert labeler.label("Cannot exclude pneumonia.")[PN] == -1.0
    assert labeler.label("Opacity may represent atelectasis.")[AT] == -1.0
    assert labeler.label("Could be secondary to a small effusion versus scarring.")[PE] == -1.0


def test_uncertainty_scope_ends_at_however(labeler):
    out = labeler.label("Possible small left effusion; however, there is a definite right pneumothorax.")
    assert (out[PE], out[PX]) == (-1.0, 1.0)


def test_unmention_exclusions(labeler):
    assert labeler.label("Small pericardial effusion.")[PE] is None
    assert labeler.label("Calcified nodule in the left lung.")[LL] is None
    assert labeler.label("Plate-like atelectasis at the left base.")[SD] is None


def test_aggregation_prefers_positive_then_uncertain(labeler):
    assert labeler.label("No left effusion. Small right pleural effusion.")[PE] == 1.0
    assert labeler.label("No large effusion. Possible small effusion.")[PE] == -1.0


def test_no_finding_rule(labeler):
    assert labeler.label("No acute cardiopulmonary abnormality.")[NF] == 1.0
    assert labeler.label("Right IJ catheter in place. No pneumothorax.")[NF] == 1.0  # devices don't count
    assert labeler.label("Possible pneumonia.")[NF] is None
    assert labeler.label("Degenerative changes of the spine.")[NF] is None  # other findings block it
    # Text that mentions nothing is a normal study; no text at all (once history-like sections are dropped) is not.
    assert labeler.label("Normal chest.") == {name: 1.0 if name == NF else None for name in OBSERVATIONS}
    assert labeler.label("   ") == {name: None for name in OBSERVATIONS}
    assert labeler.label("COMPARISON: None.") == {name: None for name in OBSERVATIONS}


def test_deidentification_tokens_are_harmless(labeler):
    assert labeler.label("XXXX XXXX. XXXX pleural effusion XXXX.")[PE] == 1.0
    assert labeler.label("No XXXX. XXXX XXXX are normal.")[NF] == 1.0


def test_label_many_matches_label(labeler):
    reports = [r for r, _ in LABELLED_REPORTS[:5]]
    assert labeler.label_many(reports) == [labeler.label(r) for r in reports]


def test_hand_labelled_set_micro_f1(labeler):
    refs = [expected_row(labels) for _, labels in LABELLED_REPORTS]
    preds = labeler.label_many(report for report, _ in LABELLED_REPORTS)
    scores = clinical_efficacy(refs, preds)
    assert len(LABELLED_REPORTS) >= 40
    assert scores["ce_micro_f1_14"] >= 0.85, scores


def test_label_csv_writes_the_chexpert_layout(tmp_path):
    source, target = tmp_path / "reports.csv", tmp_path / "labeled.csv"
    with open(source, "w", newline="") as f:
        csv.writer(f).writerows([
            ("study", "report"),
            ("s1", "Small right pleural effusion.\nPossible pneumonia."),
            ("s2", ""),
            ("s3", "No acute cardiopulmonary abnormality."),
        ])
    assert label_csv(str(source), "report", str(target)) == 3
    with open(target, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Reports", *OBSERVATIONS]
    by_name = [dict(zip(rows[0], r)) for r in rows[1:]]
    assert by_name[0]["Reports"] == "Small right pleural effusion.\nPossible pneumonia."
    assert (by_name[0][PE], by_name[0][PN], by_name[0][NF], by_name[0][PX]) == ("1.0", "-1.0", "", "")
    assert set(rows[2][1:]) == {""}
    assert by_name[2][NF] == "1.0" and set(rows[3][2:]) == {""}


def test_label_csv_names_the_missing_column(tmp_path):
    source = tmp_path / "reports.csv"
    source.write_text("study,findings\ns1,No effusion.\n")
    with pytest.raises(ValueError, match=r"'report'.*\['study', 'findings'\]"):
        label_csv(str(source), "report", str(tmp_path / "out.csv"))


# Negated lists with a sized item, and hedges: written for issue 17 before the rules that pass them, labelled by
# CheXpert conventions (NegBio negates and hedges every item joined by "or" under one cue).
@pytest.mark.parametrize("report, expected", [
    ("No focal consolidation, suspicious pulmonary opacity, large pleural effusion, or pneumothorax is identified.",
     {CO: 0.0, LO: 0.0, PE: 0.0, PX: 0.0, NF: 1.0}),
    ("Without evidence of focal consolidation, pulmonary edema, large pleural effusion, or pneumothorax.",
     {CO: 0.0, ED: 0.0, PE: 0.0, PX: 0.0, NF: 1.0}),
    ("No pneumothorax, new consolidation, or large effusion.", {PX: 0.0, CO: 0.0, PE: 0.0, NF: 1.0}),
    ("No definite focal consolidation, large effusion or pneumothorax.", {CO: 0.0, PE: 0.0, PX: 0.0, NF: 1.0}),
    ("No pulmonary edema, large pleural effusions, or pneumothorax is seen, and the heart is enlarged.",
     {ED: 0.0, PE: 0.0, PX: 0.0, CM: 1.0}),
    # not a negated list: the sized item after a comma is stated, and so is what follows a closed list
    ("No pneumothorax, small left effusion.", {PX: 0.0, PE: 1.0}),
    ("No pneumothorax or effusion, left lower lobe atelectasis.", {PX: 0.0, PE: 0.0, AT: 1.0}),
    # hedges
    ("Left basilar opacity may represent atelectasis or pneumonia.", {LO: 1.0, AT: -1.0, PN: -1.0}),
    ("Cardiomegaly, possibly with mild edema.", {CM: 1.0, ED: -1.0}),
    ("Left lower lobe opacity, atelectasis versus consolidation.", {LO: 1.0, AT: -1.0, CO: -1.0}),
    ("Increased opacity at the right base, which may reflect atelectasis, although superimposed pneumonia cannot "
     "be excluded.", {LO: 1.0, AT: -1.0, PN: -1.0}),
    ("Streaky bibasilar opacities, likely atelectasis.", {LO: 1.0, AT: -1.0}),
    ("There may be a small left pleural effusion.", {PE: -1.0}),
    ("Left apical pneumothorax is suspected.", {PX: -1.0}),
])
def test_negated_lists_and_hedges(labeler, report, expected):
    assert labeler.label(report) == expected_row(expected)


# Rules from studying the dev half of the IU X-ray benchmark (benchmarks/labeler_agreement.py). Phrases written
# here, not taken from those reports.
@pytest.mark.parametrize("report, expected", [
    # "plate" is a device word, but not inside "endplate"; "supporting" is not "support"; B-lines are not lines
    ("Mild degenerative endplate sclerosis in the mid thoracic spine.", {SD: None}),
    ("Findings supporting a chronic process.", {SD: None}),
    ("A few B-lines at the left base.", {SD: None}),
    ("Prior median sternotomy.", {SD: None}),  # a procedure, not a device
    ("Median sternotomy wires are intact.", {SD: 1.0}),
    ("Overlying ECG leads.", {SD: 1.0}),
    ("Hyperinflation leads to flattened hemidiaphragms.", {SD: None}),
    ("Loop recorder generator over the left chest wall.", {SD: 1.0}),
    ("A spinal cord stimulator is partly imaged.", {SD: 1.0}),
    ("Bilateral breast implants.", {SD: 1.0}),
    ("Bilateral breast prostheses.", {SD: 1.0}),
    ("Suture material at the left lung apex.", {SD: 1.0}),
    # a tip placed at the cavoatrial junction, SVC or carina is a line or tube, even when its name is redacted
    ("Left XXXX with its tip at the cavoatrial junction.", {SD: 1.0}),
    ("XXXX tip 4 cm above the carina.", {SD: 1.0}),
    ("The tip of the lingula is clear.", {SD: None}),
])
def test_device_words(labeler, report, expected):
    out = labeler.label(report)
    assert {name: out[name] for name in expected} == expected


def test_deformity_is_another_finding_not_a_fracture(labeler):
    # As in the CheXpert labeler's lists (and the IU indexers' "Deformity" code): it blocks No Finding only.
    for report in ("Old deformity of the left sixth rib.", "Healed-appearing right clavicle deformity.",
                   "Mild compression deformity of a lower thoracic vertebral body."):
        out = labeler.label(report)
        assert (out[FR], out[NF]) == (None, None), report
    assert labeler.label("Healed fractures of the left sixth and seventh ribs.")[FR] == 1.0


def test_blunting_is_another_finding_not_an_effusion(labeler):
    out = labeler.label("Blunting of the right costophrenic angle, unchanged.")
    assert (out[PE], out[NF]) == (None, None)
    # a hedged effusion said in words stays uncertain
    assert labeler.label("Blunting of the left costophrenic angle may reflect a small effusion.")[PE] == -1.0


def test_cystic_fibrosis_is_not_pleural(labeler):
    assert labeler.label("Hyperinflation and bronchial wall thickening from cystic fibrosis.")[PO] is None
    assert labeler.label("Apical pleural fibrosis.")[PO] == 1.0


def test_interstitial_prominence_is_an_opacity(labeler):
    assert labeler.label("Diffuse interstitial prominence.")[LO] == 1.0
    assert labeler.label("Mild interstitial thickening at both bases.")[LO] == 1.0
    assert labeler.label("No interstitial prominence.")[LO] == 0.0


def test_copula_hedge_looks_forward_too(labeler):
    # "there is suspected X" is as hedged as "X is suspected"; tight: the hedge does not cross a comma or "and"
    assert labeler.label("There is suspected left lower lobe consolidation.")[CO] == -1.0
    assert labeler.label("Pneumothorax is suspected.")[PX] == -1.0
    out = labeler.label("There is likely a small right effusion, and left basilar atelectasis.")
    assert (out[PE], out[AT]) == (-1.0, 1.0)


def test_low_lung_volumes_and_curvature_are_other_findings(labeler):
    # The lists hold hyperinflation and scoliosis; their counterparts rule No Finding out the same way.
    for report in ("Low lung volumes. Otherwise clear.", "Lung volumes are reduced. No effusion.",
                   "The lungs are hypoinflated.", "Mild levocurvature of the lumbar spine."):
        assert labeler.label(report)[NF] is None, report
    assert labeler.label("Normal lung volumes. No effusion.")[NF] == 1.0
    assert labeler.label("Normal curvature of the thoracic spine.")[NF] == 1.0


def test_uncalcified_nodule_is_a_lesion(labeler):
    assert labeler.label("A calcified nodule in the right upper lobe.")[LL] is None  # CheXpert's unmention
    assert labeler.label("An 8 mm uncalcified nodule in the right upper lobe.")[LL] == 1.0
    assert labeler.label("A non-calcified nodule in the left lower lobe.")[LL] == 1.0


def test_not_well_seen_with_a_hyphen_is_uncertain(labeler):
    assert labeler.label("The small left nodule is not well-seen on this study.")[LL] == -1.0


def test_possibility_and_differential_hedge(labeler):
    assert labeler.label("The possibility of a small right rib fracture is raised.")[FR] == -1.0
    assert labeler.label("Aspiration pneumonia is in the differential.")[PN] == -1.0
    assert labeler.label("Pneumonia is present.")[PN] == 1.0


# --- benchmarks/labeler_agreement.py: the MeSH -> CheXpert mapping, on made-up rows in the IU X-ray CSV layout ---

IU_FIXTURE = Path(__file__).parent / "fixtures" / "iu_mesh" / "indiana_reports.csv"
AGREEMENT_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "labeler_agreement.py"


@pytest.fixture(scope="module")
def agreement():
    spec = importlib.util.spec_from_file_location("labeler_agreement", AGREEMENT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(module)
    return module


def test_mesh_mapping(agreement):
    assert agreement.human_labels("normal") == {NF: 1.0}
    assert agreement.human_labels("No Indexing") is None
    assert agreement.human_labels("Cardiomegaly/borderline;Pulmonary Artery/enlarged") == {CM: -1.0}
    assert agreement.human_labels("Cardiomegaly/borderline;Cardiac Shadow/enlarged/mild") == {CM: 1.0}
    assert agreement.human_labels("Opacity/lung/upper lobe/right/round;Density/ribs/left") == {LO: 1.0, LL: 1.0}
    assert agreement.human_labels("Density/lung/middle lobe/round") == {LL: 1.0}
    assert agreement.human_labels("Catheters, Indwelling/right;Technical Quality of Image Unsatisfactory ") == {
        SD: 1.0, NF: 1.0}
    assert agreement.human_labels("Thickening/pleura/apex;Cicatrix/lung/apex;Calcified Granuloma") == {
        PO: 1.0, LO: 1.0}
    assert agreement.human_labels("Hydropneumothorax/right;Pleural Effusion/left/moderate") == {PX: 1.0, PE: 1.0}
    # ignored headings are neither positive nor No Finding
    assert agreement.human_labels("Markings/bronchovascular;Lung/hypoinflation") == {}
    assert agreement.human_labels("Mediastinum/lymph nodes/enlarged;Cardiac Shadow/enlarged") == {CM: 1.0}
    assert agreement.human_labels("Mediastinum/prominent") == {ECM: 1.0}
    assert agreement.human_labels("Cardiac Shadow/obscured") == {}


def test_mesh_fixture_split_and_rows(agreement):
    dev = [row.uid for row in agreement.read_rows(IU_FIXTURE, "dev")]
    test = [row.uid for row in agreement.read_rows(IU_FIXTURE, "test")]
    assert dev == [1, 3, 7]  # 5 is not indexed, 9 has no report text
    assert test == [2, 4, 6, 8, 10]
    rows = {row.uid: row for row in agreement.read_rows(IU_FIXTURE, "all")}
    assert rows[3].text.startswith("FINDINGS: A 9 mm nodular opacity") and "\nIMPRESSION: " in rows[3].text
    assert rows[8].human == {}


def test_agreement_conventions(agreement):
    # the human's /borderline (-1.0) meets the labeler's uncertain: present for lenient, absent for strict
    pairs = [({CM: -1.0}, {CM: -1.0}), ({PE: 1.0}, {PE: 0.0}), ({}, {PN: -1.0}), ({AT: 1.0}, {AT: 1.0})]
    lenient = agreement.agreement(pairs, "lenient")
    assert (lenient[CM].tp, lenient[PE].fn, lenient[PN].fp, lenient[AT].tp) == (1, 1, 1, 1)
    assert agreement.micro(lenient).scores() == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    strict = agreement.agreement(pairs, "strict")
    assert (strict[CM].tp, strict[CM].fn, strict[PN].fp) == (0, 0, 0)
    assert agreement.micro(strict).scores() == pytest.approx((1.0, 0.5, 2 / 3))


def test_agreement_script_prints_micro_f1_last(tmp_path):
    run = [sys.executable, str(AGREEMENT_SCRIPT), "--reports", str(IU_FIXTURE), "--split", "all"]
    out = subprocess.run(run, capture_output=True, text=True, check=True, timeout=120).stdout.splitlines()
    assert out[0].startswith("split all: 8 reports") and re.fullmatch(r"micro-F1 [01]\.\d{3}", out[-1])
    refused = subprocess.run(run[:-1] + ["test", "--errors", "5"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "dev split only" in refused.stderr


def test_a_leading_normal_negates_what_follows(labeler):
    # "normal" found as the backward cue ("heart size normal") must still read forward
    assert labeler.label("Normal interstitial markings.")[LO] == 0.0
    assert labeler.label("Interstitial markings are normal.")[LO] == 0.0
    assert labeler.label("Heart size normal.")[CM] == 0.0
    assert labeler.label("Normal heart size, prominent interstitial markings.")[LO] == 1.0


# "removal of", "resolution of", "free of" ... take a noun phrase: a conjunct "and the/left/right/bilateral B" is part
# of it (dev report 1557 of the IU X-ray benchmark kept a removed catheter as present). Phrases written here.
@pytest.mark.parametrize("report, expected", [
    ("Interval removal of the tracheostomy tube and right subclavian catheter.", {SD: 0.0}),
    ("Status post removal of the endotracheal tube and the nasogastric tube.", {SD: 0.0}),
    ("Removal of the endotracheal tube, feeding tube, and left chest tube.", {SD: 0.0}),
    ("Interval resolution of the left pleural effusion and right pneumothorax.", {PE: 0.0, PX: 0.0}),
    ("Resolution of right basilar consolidation and the left lower lobe atelectasis.", {CO: 0.0, AT: 0.0}),
    ("The lungs are free of consolidation and bilateral effusions.", {CO: 0.0, PE: 0.0}),
    # the conjunct has a verb of its own, or the scope ends: it is stated
    ("Removal of the tracheostomy tube and the right subclavian catheter remains.", {SD: 1.0}),
    ("Resolution of the left pleural effusion and the right pneumothorax is unchanged.", {PE: 0.0, PX: 1.0}),
    ("Removal of the tube; the catheter remains.", {SD: 1.0}),
    ("Interval removal of the left chest tube and small residual left apical pneumothorax.", {SD: 0.0, PX: 1.0}),
    ("Removal of the endotracheal tube and a new left internal jugular catheter.", {SD: 1.0}),
    # a determiner "no" keeps its stop: "no A and left B" states B
    ("No pneumothorax and left pleural effusion.", {PX: 0.0, PE: 1.0}),
    ("No effusion but a catheter is in place.", {PE: 0.0, SD: 1.0}),
    ("No pneumothorax or right pleural effusion.", {PX: 0.0, PE: 0.0}),
    ("Without consolidation or effusion.", {CO: 0.0, PE: 0.0}),
])
def test_coordinated_object_of_a_removal_or_resolution(labeler, report, expected):
    out = labeler.label(report)
    assert {name: out[name] for name in expected} == expected


def test_a_stop_that_runs_into_the_mention_still_ends_the_scope(labeler):
    # "and the" / ", the" end a negation's scope even when that "the" begins the mention "the heart"
    assert labeler.label("No effusion and the heart is enlarged.")[CM] == 1.0
    assert labeler.label("No consolidation, the heart is enlarged.")[CM] == 1.0
    assert labeler.label("The lungs are free of consolidation and the heart is enlarged.")[CM] == 1.0
    assert labeler.label("No effusion. The heart is not enlarged.")[CM] == 0.0

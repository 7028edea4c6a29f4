"""Procedurally drawn frontal chest "radiographs" with matching reports and VQA pairs.

The quickstart and the tests cannot download data, so medvl draws its own: a PA chest film with a body outline,
dark lungs with vessel markings, ribs, clavicles, spine, mediastinum and heart, plus zero to two findings drawn
into the pixels. The report and the question-answer pairs are written from the same ground truth, so a model
can only write them right by looking at the image.

Radiological convention: the image is viewed as if facing the patient, so the patient's LEFT is on the IMAGE'S
RIGHT. Every ``side`` in this module (findings, reports, answers) is the patient's side.

Findings and how they look (all sized to stay visible at 128 px, where a tiny BLIP must learn them):

- ``pleural_effusion`` (left/right): dense white filling the lower 40-50 % of that lung, its upper edge a meniscus
  that climbs the lateral chest wall.
- ``cardiomegaly``: cardiothoracic ratio 0.60-0.68 instead of 0.38-0.46.
- ``nodule`` (left/right x upper/lower zone): a bright disc of radius 8.5-10 % of the image width, a mass really.
  With three zones (upper/mid/lower) and discs of 7.5-9 %, the quickstart model (1,500 steps) did not even learn
  that a nodule was there (25 % right on films with one); with two zones and these discs it gets 72 %, and
  nodules are sampled more often than other findings (:data:`FINDING_WEIGHTS`).
- ``pneumothorax`` (left/right): the lung collapsed to ~half its size towards the hilum, leaving a black,
  marking-free apical and lateral space bounded by a bright visceral pleural line.

Combinations that would hide a finding are never sampled: no effusion and pneumothorax on one side, no nodule on
the side of a pneumothorax, a nodule on the side of an effusion only in the upper zone, and no left lower zone
nodule behind an enlarged heart.

Reports are templated with a fixed sentence order (heart, lungs, pleura) and plain radiology words that a
rule-based CheXpert labeler reads correctly; no phrase variation, because every extra way of saying a thing costs
a small model steps it does not have. VQA pairs (4-6 per image) ask closed yes/no questions, as many "yes" as "no"
on every image, and open ones (side, zone, main abnormality, heart size).

Speed (~2-3 ms per 128 px image on one core) comes from three choices: what no finding changes (body, lungs,
bones) is drawn once per patient and cached; noise is cropped from fixed fields instead of drawn per image; and
PNGs are written by :func:`encode_gray_png` rather than Pillow's slower encoder.
"""
from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from medvl.data.records import Record

SIDES = ("right", "left")  # patient's side; "left" is drawn on the image's right
ZONES = ("upper", "lower")  # see the module docstring: three zones and smaller discs were not learned
FINDING_NAMES = ("cardiomegaly", "nodule", "pleural_effusion", "pneumothorax")  # report order: heart, lungs, pleura
LATERAL_FINDINGS = ("nodule", "pleural_effusion", "pneumothorax")
MAIN_ABNORMALITY_PRIORITY = ("pneumothorax", "pleural_effusion", "nodule", "cardiomegaly")  # by clinical urgency
ANSWER_NAMES = {"cardiomegaly": "cardiomegaly", "nodule": "nodule", "pleural_effusion": "pleural effusion",
                "pneumothorax": "pneumothorax"}

FINDING_COUNT_PROBS = (0.25, 0.45, 0.30)  # P(0), P(1), P(2) findings
FINDING_WEIGHTS = (0.22, 0.34, 0.22, 0.22)  # per FINDING_NAMES: nodules, the hardest to learn, come most often
QA_PAIRS_MAX = 6
CLOSED_YES_PER_IMAGE = 2  # and as many "no": yes/no are balanced image by image

# Grey levels of the tissues, on a 0 (black) .. 1 (white) scale before exposure jitter.
AIR, SOFT_TISSUE, LUNG, MEDIASTINUM, HEART = 0.04, 0.55, 0.22, 0.62, 0.64
FLUID, PNEUMOTHORAX_AIR, PLEURAL_LINE, NODULE_GAIN = 0.72, 0.02, 0.55, 0.6


# --------------------------------------------------------------------------------------------- ground truth


def _side_sign(side: str) -> float:
    """-1 for the patient's right (image left), +1 for the patient's left (image right)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return 1.0 if side == "left" else -1.0


def _finding_key(finding: dict) -> tuple:
    return (FINDING_NAMES.index(finding["name"]), finding.get("side", ""))


def _validate(findings: list[dict]) -> list[dict]:
    names = [f.get("name") for f in findings]
    for finding in findings:
        if finding.get("name") not in FINDING_NAMES:
            raise ValueError(f"unknown finding {finding!r}; expected a name in {FINDING_NAMES}")
        if finding["name"] in LATERAL_FINDINGS:
            _side_sign(finding.get("side", ""))
        if finding["name"] == "nodule" and finding.get("zone") not in ZONES:
            raise ValueError(f"a nodule needs a zone in {ZONES}, got {finding!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"each finding may appear once, got {names}")
    return sorted(findings, key=_finding_key)


def _compatible(findings: list[dict]) -> bool:
    """False where one finding would hide another (see the module docstring)."""
    sides = {f["name"]: f.get("side") for f in findings}
    nodule = next((f for f in findings if f["name"] == "nodule"), {"side": None, "zone": None})
    hidden = (
        "pleural_effusion" in sides and sides["pleural_effusion"] == sides.get("pneumothorax"),
        nodule["side"] is not None and nodule["side"] == sides.get("pneumothorax"),
        nodule["side"] == sides.get("pleural_effusion", "none") and nodule["zone"] != "upper",
        (nodule["side"], nodule["zone"]) == ("left", "lower") and "cardiomegaly" in sides,
    )
    return not any(hidden)


def _sample_finding(name: str, rng: np.random.Generator) -> dict:
    if name == "cardiomegaly":
        return {"name": name}
    finding = {"name": name, "side": SIDES[rng.integers(2)]}
    if name == "nodule":
        finding["zone"] = ZONES[rng.integers(len(ZONES))]
    return finding


def sample_findings(rng: np.random.Generator) -> list[dict]:
    """0-2 distinct findings in report order; "normal" (no finding) about a quarter of the time."""
    count = int(rng.choice(len(FINDING_COUNT_PROBS), p=FINDING_COUNT_PROBS))
    while True:
        names = rng.choice(FINDING_NAMES, size=count, replace=False, p=FINDING_WEIGHTS)
        findings = [_sample_finding(str(name), rng) for name in names]
        if _compatible(findings):
            return sorted(findings, key=_finding_key)


# --------------------------------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class Anatomy:
    """One patient's body habitus, in canonical coordinates (x, y in [-1, 1], x grows to the image's right)."""

    body_half_width: float
    lung_medial_x: float  # distance of each lung's medial border from the midline
    lung_width: float
    lung_top_y: float
    lung_height: float
    normal_ctr: float  # cardiothoracic ratio when the heart is not enlarged
    enlarged_ctr: float
    rib_spacing: float

    @property
    def thorax_half_width(self) -> float:
        return self.lung_medial_x + self.lung_width


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    return Anatomy(
        body_half_width=rng.uniform(0.9, 0.98),
        lung_medial_x=rng.uniform(0.08, 0.11),
        lung_width=rng.uniform(0.55, 0.62),
        lung_top_y=rng.uniform(-0.72, -0.64),
        lung_height=rng.uniform(1.18, 1.28),
        normal_ctr=rng.uniform(0.38, 0.46),
        enlarged_ctr=rng.uniform(0.60, 0.68),
        rib_spacing=rng.uniform(0.15, 0.18),
    )


def _canvas_size(image_size: int) -> int:
    """Anatomy is drawn on a canvas a margin larger than the image, so positioning never exposes an edge."""
    return image_size + 2 * math.ceil(image_size / 16)


@lru_cache(maxsize=4)
def _canvas_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Canonical coordinates of the canvas pixel centres (the image itself spans [-1, 1])."""
    n = _canvas_size(image_size)
    axis = ((np.arange(n, dtype=np.float32) + 0.5 - n / 2) * (2.0 / image_size)).astype(np.float32)
    return _read_only(*np.meshgrid(axis, axis))


@lru_cache(maxsize=4)
def _noise_fields(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed white noise and vessel-like ridges (0..1), twice the canvas size; each study takes a random crop.

    Cropping a cached field instead of drawing fresh noise per image is what keeps rendering at a few ms.
    The ridges are the zero crossings of smooth noise: thin, branching, bright lines, like lung vessels.
    """
    n = 2 * _canvas_size(image_size)
    rng = np.random.default_rng(20240229)
    white = rng.standard_normal((n, n), dtype=np.float32)
    smooth = np.zeros((n, n), np.float32)
    for cells, amplitude in ((24, 1.0), (64, 0.5)):
        coarse = Image.fromarray(rng.standard_normal((cells, cells), dtype=np.float32), mode="F")
        smooth += amplitude * np.asarray(coarse.resize((n, n), Image.BICUBIC))
    ridges = np.clip(1.0 - np.abs(smooth) * 2.5, 0.0, 1.0)
    return _read_only(white, ridges)


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for array in arrays:
        array.setflags(write=False)
    return arrays


def _crop(field: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    top, left = rng.integers(0, field.shape[0] - n + 1, size=2)
    return field[top : top + n, left : left + n]


def _inside(distance: np.ndarray, edge: float) -> np.ndarray:
    """1 inside a shape (distance < 0), 0 outside, with an anti-aliased ramp ``edge`` wide."""
    return np.clip(0.5 - distance / edge, 0.0, 1.0)


def _blend(image: np.ndarray, value, weight: np.ndarray) -> np.ndarray:
    return image + (value - image) * weight


def _lung_distance(x: np.ndarray, y: np.ndarray, a: Anatomy, sign: float) -> np.ndarray:
    """Approximate signed distance to one lung's outline (negative inside).

    The lung is the intersection of four curves in lung-relative coordinates t (0 medial .. 1 lateral) and
    s (0 apex .. 1 base): a rounded apex, a lateral wall that widens downwards, a diaphragm dome that is
    highest mid-lung and deepest at the costophrenic angle, and a straight medial border.
    """
    t = (sign * x - a.lung_medial_x) * (1.0 / a.lung_width)
    s = (y - a.lung_top_y) * (1.0 / a.lung_height)
    apex = a.lung_height * (1.1 * (t - 0.35) ** 2 - s)
    lateral = a.lung_width * (t - 1.0 + 0.3 * np.clip(1.0 - s, 0.0, 1.0) ** 2)
    diaphragm = a.lung_height * (s - (0.95 - 0.55 * t + 0.6 * t * t))
    return np.maximum(np.maximum(apex, lateral), np.maximum(diaphragm, -a.lung_width * t))


@dataclass(frozen=True)
class _AnatomyLayers:
    base: np.ndarray  # body, lungs, mediastinum and trachea: everything a finding may cover
    lungs: dict[str, np.ndarray]  # soft mask per patient side
    vessel_weight: np.ndarray  # where lung markings show, strongest near the hila
    bones: np.ndarray  # additive: ribs, clavicles, spine


@lru_cache(maxsize=4)
def _anatomy_layers(a: Anatomy, image_size: int) -> _AnatomyLayers:
    """The parts of a patient's film that no finding changes, cached so a patient's studies share them."""
    x, y = _canvas_grid(image_size)
    edge, ax = 2.0 / image_size, np.abs(x)
    shoulders = -0.8 + 0.35 * np.clip(ax - 0.3, 0.0, None)
    body = _inside(np.maximum(ax - a.body_half_width, shoulders - y), 6 * edge)
    neck = _inside(ax - 0.28, 6 * edge)
    base = AIR + (SOFT_TISSUE - AIR) * np.maximum(body, neck)
    base += 0.06 * np.clip(ax - a.thorax_half_width, 0.0, 0.2) / 0.2 * body  # chest wall and arms

    lungs = {side: _inside(_lung_distance(x, y, a, _side_sign(side)), edge) for side in SIDES}
    lung = np.maximum(lungs["left"], lungs["right"])
    base = _blend(base, LUNG, lung)
    mediastinum = _inside(ax - 0.1, 4 * edge) * _inside(-0.95 - y, 4 * edge)
    base = _blend(base, MEDIASTINUM, mediastinum)
    trachea = _inside(ax - 0.03, 2 * edge) * _inside(y - (a.lung_top_y + 0.35 * a.lung_height), 6 * edge)
    base = _blend(base, 0.35, trachea)

    hilum_distance = np.sqrt((ax - a.lung_medial_x - 0.1) ** 2 + (y - a.lung_top_y - 0.45 * a.lung_height) ** 2)
    vessel_weight = 0.12 * np.clip(1.3 - hilum_distance / 0.5, 0.2, 1.0) * lung * (1.0 - mediastinum)

    # Posterior ribs curve down towards the chest wall; anterior ones run down towards the sternum.
    posterior = np.clip(np.cos(2 * np.pi * (y - 0.6 * ax * ax) / a.rib_spacing) * 3.0 - 2.0, 0.0, 1.0)
    anterior = np.clip(np.cos(2 * np.pi * (y + 0.4 * ax) / (1.3 * a.rib_spacing)) * 3.0 - 2.2, 0.0, 1.0)
    rib_cage = (ax > 0.07) & (ax < a.thorax_half_width + 0.08) & (y > a.lung_top_y - 0.1)
    ribs = (0.08 * posterior + 0.04 * anterior) * (0.3 + 0.7 * lung) * (rib_cage & (y < a.lung_top_y + a.lung_height))
    clavicle_y = a.lung_top_y + 0.05 + 0.25 * (ax - 0.15) - 0.4 * (ax - 0.15) ** 2
    clavicles = np.clip(1.0 - np.abs(y - clavicle_y) / 0.035, 0.0, 1.0) * ((ax > 0.1) & (ax < 0.75))
    spine = (0.05 + 0.025 * (1.0 + np.cos(2 * np.pi * y / 0.11))) * _inside(ax - 0.065, 0.03)
    bones = ribs + 0.14 * clavicles + spine
    return _AnatomyLayers(*_read_only(base), lungs, *_read_only(vessel_weight, bones))


def _draw_heart(image, x, y, a: Anatomy, ctr: float, size: int) -> np.ndarray:
    width = ctr * 2 * a.thorax_half_width
    half_height = 0.2 + 0.2 * width
    center_x = 0.18 * width  # two thirds of the heart lie on the patient's left (image right)
    center_y = a.lung_top_y + a.lung_height - 0.65 * half_height
    level = ((x - center_x) * (2.0 / width)) ** 2 + ((y - center_y) * (1.0 / half_height)) ** 2
    return _blend(image, HEART, _inside(level - 1.0, 16.0 / size / width))


def _draw_effusion(image, x, y, a: Anatomy, lung: np.ndarray, sign: float, rng) -> np.ndarray:
    """Fluid fills the lung base; its meniscus climbs the lateral chest wall."""
    level = a.lung_top_y + a.lung_height * (1.0 - rng.uniform(0.40, 0.50))
    lateral_fraction = np.clip((sign * x - a.lung_medial_x) / a.lung_width, 0.0, 1.0)
    meniscus = level - rng.uniform(0.18, 0.26) * lateral_fraction**2
    fluid = np.clip((y - meniscus) / 0.06, 0.0, 1.0) * lung
    return _blend(image, FLUID, fluid)


def _draw_pneumothorax(image, x, y, a: Anatomy, lung: np.ndarray, sign: float, rng, size: int) -> np.ndarray:
    """Collapse the lung towards its hilum; the space it leaves is black, edged by the visceral pleura."""
    collapse = rng.uniform(0.45, 0.58)
    hilum_x = sign * a.lung_medial_x
    hilum_y = a.lung_top_y + 0.88 * a.lung_height
    collapsed_distance = collapse * _lung_distance((x - hilum_x) / collapse + hilum_x,
                                                   (y - hilum_y) / collapse + hilum_y, a, sign)
    collapsed = _inside(collapsed_distance, 2.0 / size)
    image = _blend(image, PNEUMOTHORAX_AIR, lung * (1.0 - collapsed))
    image = image + 0.08 * collapsed * lung  # the collapsed lung is denser
    pleural_line = np.clip(1.0 - np.abs(collapsed_distance) / (2.0 / size), 0.0, 1.0) * lung
    return _blend(image, PLEURAL_LINE, pleural_line)


def nodule_center(anatomy: Anatomy, side: str, zone: str) -> tuple[float, float]:
    """Centre of a nodule in a lung zone, in canonical coordinates; lower-zone ones sit laterally, off the heart."""
    t = {"upper": 0.42, "lower": 0.7}[zone]
    s = {"upper": 0.26, "lower": 0.72}[zone]
    x = anatomy.lung_medial_x + t * anatomy.lung_width
    return _side_sign(side) * x, anatomy.lung_top_y + s * anatomy.lung_height


def _draw_nodule(image, x, y, a: Anatomy, side: str, zone: str, rng) -> np.ndarray:
    cx, cy = nodule_center(a, side, zone)
    cx, cy = cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(-0.04, 0.04)
    radius = 2.0 * rng.uniform(0.085, 0.1)  # canonical units: the image is 2 wide
    distance = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) * (1.0 / radius)
    return image + NODULE_GAIN * np.clip((1.0 - distance) * 4.0, 0.0, 1.0)


def _position(canvas: np.ndarray, pose: np.ndarray, image_size: int) -> np.ndarray:
    """Crop the image out of the canvas through a shift, scale and rotation (patient positioning)."""
    scale, degrees, shift_x, shift_y = (float(v) for v in pose)
    cos, sin = math.cos(math.radians(degrees)) / scale, math.sin(math.radians(degrees)) / scale
    half_in, half_out = canvas.shape[0] / 2, image_size / 2
    # Output pixel p maps to canvas pixel R(p - centre - shift) / scale + canvas centre (shift in pixels).
    ox, oy = -half_out * (1.0 + shift_x), -half_out * (1.0 + shift_y)
    data = (cos, sin, cos * ox + sin * oy + half_in, -sin, cos, -sin * ox + cos * oy + half_in)
    moved = Image.fromarray(canvas, mode="F").transform((image_size, image_size), Image.AFFINE, data,
                                                        resample=Image.BILINEAR)
    return np.asarray(moved)


def _expose(image: np.ndarray, exposure: np.ndarray) -> Image.Image:
    contrast, brightness, gamma = (float(v) for v in exposure)
    pixels = (np.clip(image * contrast + brightness, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    gamma_table = (np.linspace(0.0, 1.0, 256) ** gamma * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(gamma_table[pixels], mode="L")


def _render(findings: list[dict], anatomy: Anatomy, rng: np.random.Generator, image_size: int) -> Image.Image:
    # Acquisition draws come first, so that two finding lists drawn with equally seeded generators give
    # pixel-aligned films that differ only where the findings are.
    white, ridges = _noise_fields(image_size)
    vessels, quantum_noise = _crop(ridges, _canvas_size(image_size), rng), _crop(white, image_size, rng)
    pose = rng.uniform((0.93, -3.0, -0.06, -0.06), (1.05, 3.0, 0.06, 0.06))  # scale, degrees, shift x, y
    exposure = rng.uniform((0.85, -0.05, 0.85), (1.1, 0.05, 1.15))  # contrast, brightness, gamma

    x, y = _canvas_grid(image_size)
    layers = _anatomy_layers(anatomy, image_size)
    by_name = {f["name"]: f for f in findings}
    image = layers.base + layers.vessel_weight * vessels
    if "pneumothorax" in by_name:
        side = by_name["pneumothorax"]["side"]
        image = _draw_pneumothorax(image, x, y, anatomy, layers.lungs[side], _side_sign(side), rng, image_size)
    ctr = anatomy.enlarged_ctr if "cardiomegaly" in by_name else anatomy.normal_ctr
    image = _draw_heart(image, x, y, anatomy, ctr, image_size)
    if "pleural_effusion" in by_name:  # over the heart: fluid is denser and hides the cardiac border
        side = by_name["pleural_effusion"]["side"]
        image = _draw_effusion(image, x, y, anatomy, layers.lungs[side], _side_sign(side), rng)
    image = image + layers.bones
    if "nodule" in by_name:
        nodule = by_name["nodule"]
        image = _draw_nodule(image, x, y, anatomy, nodule["side"], nodule["zone"], rng)
    return _expose(_position(image, pose, image_size) + 0.02 * quantum_noise, exposure)


def render_study(findings: list[dict], *, rng: np.random.Generator, image_size: int = 128) -> Image.Image:
    """Draw one grayscale ("L") frontal chest radiograph of a new random patient showing ``findings``."""
    findings = _validate(findings)
    if not _compatible(findings):
        raise ValueError(f"these findings would hide one another: {findings}")
    return _render(findings, sample_anatomy(rng), rng, image_size)


# ------------------------------------------------------------------------------------------------------ text


def _nodule_location(nodule: dict) -> str:
    return f"{nodule['side']} {nodule['zone']} zone"


def write_report(findings: list[dict]) -> str:
    """The templated report: heart, then lungs, then pleura, always in that order."""
    by_name = {f["name"]: f for f in _validate(findings)}
    sentences = ["The heart is enlarged." if "cardiomegaly" in by_name else "The heart size is normal."]
    if "nodule" in by_name:
        sentences.append(f"There is a nodule in the {_nodule_location(by_name['nodule'])}.")
    else:
        sentences.append("The lungs are clear.")
    effusion, pneumothorax = by_name.get("pleural_effusion"), by_name.get("pneumothorax")
    if effusion:
        sentences.append(f"There is a {effusion['side']} pleural effusion.")
    if pneumothorax:
        sentences.append(f"There is a {pneumothorax['side']} pneumothorax.")
    if not effusion and not pneumothorax:
        sentences.append("There is no pleural effusion or pneumothorax.")
    elif not effusion:
        sentences.append("There is no pleural effusion.")
    elif not pneumothorax:
        sentences.append("There is no pneumothorax.")
    return " ".join(sentences)


def _closed_questions(by_name: dict[str, dict]) -> list[tuple[str, bool]]:
    """Every yes/no question this module asks, with its answer for these findings."""
    def on(name: str, side: str) -> bool:
        return by_name.get(name, {}).get("side") == side

    questions = [
        ("Is the heart enlarged?", "cardiomegaly" in by_name),
        ("Is the heart size normal?", "cardiomegaly" not in by_name),
        ("Is there a pleural effusion?", "pleural_effusion" in by_name),
        ("Is there a pneumothorax?", "pneumothorax" in by_name),
        ("Is there a lung nodule?", "nodule" in by_name),
        ("Is this chest x-ray normal?", not by_name),
    ]
    for side in SIDES:
        questions += [
            (f"Is there a pleural effusion on the {side}?", on("pleural_effusion", side)),
            (f"Is there a pneumothorax on the {side}?", on("pneumothorax", side)),
            (f"Is there a nodule in the {side} lung?", on("nodule", side)),
        ]
    return questions


def _open_questions(by_name: dict[str, dict]) -> list[tuple[str, str]]:
    main = next((n for n in MAIN_ABNORMALITY_PRIORITY if n in by_name), None)
    questions = [("What is the main abnormality?", ANSWER_NAMES[main] if main else "none")]
    if "pleural_effusion" in by_name:
        questions.append(("Which side is the pleural effusion on?", by_name["pleural_effusion"]["side"]))
    if "pneumothorax" in by_name:
        questions.append(("Which side is the pneumothorax on?", by_name["pneumothorax"]["side"]))
    if "nodule" in by_name:
        questions.append(("Where is the nodule?", _nodule_location(by_name["nodule"])))
    questions.append(("What is the size of the heart?", "enlarged" if "cardiomegaly" in by_name else "normal"))
    return questions


def qa_pairs(findings: list[dict], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """4-6 (question, answer, answer_type) pairs: as many "yes" as "no" (up to two each), then open questions.

    The main abnormality, when there are two, is the more urgent one (:data:`MAIN_ABNORMALITY_PRIORITY`).
    """
    by_name = {f["name"]: f for f in _validate(findings)}
    closed = _closed_questions(by_name)
    yes = [q for q, answer in closed if answer]
    no = [q for q, answer in closed if not answer]
    count = min(CLOSED_YES_PER_IMAGE, len(yes), len(no))
    picked = [(yes[i], "yes") for i in rng.permutation(len(yes))[:count]]
    picked += [(no[i], "no") for i in rng.permutation(len(no))[:count]]
    pairs = [(*picked[i], "closed") for i in rng.permutation(len(picked))]
    pairs += [(q, answer, "open") for q, answer in _open_questions(by_name)]
    return pairs[:QA_PAIRS_MAX]


# --------------------------------------------------------------------------------------------------- records


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_gray_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of an 8-bit grayscale array: "Sub" filter on every row, zlib level 1.

    Written out because Pillow's encoder tries every filter on every row and costs ~1 ms per 128 px image,
    over a third of the whole budget; this costs ~0.4 ms for files within 10 % of Pillow's size.
    """
    height, width = pixels.shape
    rows = np.empty((height, width + 1), np.uint8)
    rows[:, 0] = 1  # filter type "Sub": each byte minus its left neighbour, mod 256
    rows[:, 1] = pixels[:, 0]
    rows[:, 2:] = np.diff(pixels, axis=1)  # uint8 arithmetic wraps, as the filter requires
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, grayscale, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)) + _png_chunk(b"IEND", b""))


def synthetic_records(num_images: int, *, seed: int = 0, image_size: int = 128, task: str = "caption",
                      studies_per_patient: int = 2) -> Iterator[Record]:
    """Yield records for ``num_images`` synthetic studies, ``studies_per_patient`` per patient.

    Deterministic: the same arguments give the same bytes, and each study depends only on (seed, patient,
    study), so a longer run starts with the records of a shorter one. A patient's studies share the anatomy
    and differ in findings and positioning. ``task="caption"`` yields one record per image with the report as
    ``text``; ``task="vqa"`` yields one record per question (4-6 per image), with the report as ``text`` too.
    """
    if task not in ("caption", "vqa"):
        raise ValueError(f"task must be 'caption' or 'vqa', got {task!r}")
    if studies_per_patient < 1:
        raise ValueError("studies_per_patient must be at least 1")
    for index in range(num_images):
        patient, study = divmod(index, studies_per_patient)
        anatomy = sample_anatomy(np.random.default_rng([seed, patient]))
        rng = np.random.default_rng([seed, patient, study + 1])
        findings = sample_findings(rng)
        image = encode_gray_png(np.asarray(_render(findings, anatomy, rng, image_size)))
        patient_id, study_id = f"syn-p{patient:06d}", f"syn-p{patient:06d}-s{study}"
        meta = {"findings": findings, "patient_id": patient_id, "study_id": study_id}
        report = write_report(findings)
        if task == "caption":
            yield Record(id=study_id, group_id=patient_id, image=image, text=report, meta=meta)
            continue
        for number, (question, answer, answer_type) in enumerate(qa_pairs(findings, rng)):
            yield Record(id=f"{study_id}-q{number}", group_id=patient_id, image=image, text=report,
                         question=question, answer=answer, answer_type=answer_type, meta=meta)

"""Offline rule-based CheXpert labeler (phrase lists from Irvin et al., AAAI 2019; see phrases/NOTICE.txt)."""
from medvl.eval.chexpert.labeler import CE5, OBSERVATIONS, CheXpertLabeler, LabeledReport, Mention, normalize

__all__ = ["CE5", "OBSERVATIONS", "CheXpertLabeler", "LabeledReport", "Mention", "normalize"]

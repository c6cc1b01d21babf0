"""On the inspection line: the Detector, threshold calibration, batch predict and overlays."""

from fbclip_edge.line.detector import Detection, Detector

__all__ = ["Detection", "Detector"]

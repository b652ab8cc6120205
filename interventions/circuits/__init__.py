"""Circuits: the edge graph of a decoder LM, edge attribution (EAP, EAP-IG), exact edge patching,
circuit selection and faithfulness. See docs/CIRCUITS.md."""
from .attribution import eap
from .graph import CircuitGraphError, Graph, Parts, Receiver, build_graph

__all__ = ["eap", "Graph", "Parts", "Receiver", "build_graph", "CircuitGraphError"]

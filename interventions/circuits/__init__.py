"""Circuits: the edge graph of a decoder LM, edge attribution (EAP, EAP-IG), exact edge patching,
circuit selection and faithfulness. See docs/CIRCUITS.md."""
from .attribution import eap
from .circuit import (
    BUDGETS,
    CircuitFileError,
    area,
    auroc,
    faithfulness,
    greedy,
    load_circuit,
    save_circuit,
    spearman,
    top_k,
    top_overlap,
)
from .graph import CircuitArgumentError, CircuitGraphError, Graph, Parts, Receiver, build_graph
from .patching import ablated_outputs, edge_patching, evaluate, path_patching
from .plots import plot_circuit, plot_faithfulness, score_matrix
from .tasks import TASKS, Task, TaskTokenError, agreement, capitals, fitting, greater_than, ioi

__all__ = ["eap", "edge_patching", "path_patching", "evaluate", "ablated_outputs", "faithfulness", "top_k", "greedy",
           "area", "auroc", "spearman", "top_overlap",
           "save_circuit", "load_circuit", "BUDGETS", "Graph", "Parts", "Receiver", "build_graph",
           "plot_circuit", "plot_faithfulness", "score_matrix", "Task", "TASKS", "ioi", "greater_than",
           "agreement", "capitals", "fitting", "CircuitGraphError", "CircuitArgumentError",
           "CircuitFileError", "TaskTokenError"]

"""KFP components: one thin @dsl.component per stage; each body calls the xrayops core.

All components run the one xrayops image (XRAYOPS_IMAGE, built from infra/). It already
holds kfp and xrayops, so the compiled YAML installs nothing at run time.
"""
from components.audit_labels import audit_labels_op
from components.change_record import change_record_op
from components.champion import champion_op, no_champions_op
from components.evaluate import evaluate_ensemble_op, evaluate_op
from components.finetune import finetune_op
from components.gate import gate_op
from components.ingest import ingest_op, ingest_part_op, merge_ingest_op, plan_ingest_op
from components.monitor import monitor_op
from components.pretrain import pretrain_op
from components.register import register_op
from components.release import release_op
from components.synth import synth_op
from components.version import version_dataset_op

__all__ = [
    "synth_op",
    "ingest_op",
    "plan_ingest_op",
    "ingest_part_op",
    "merge_ingest_op",
    "version_dataset_op",
    "pretrain_op",
    "finetune_op",
    "audit_labels_op",
    "evaluate_op",
    "evaluate_ensemble_op",
    "register_op",
    "release_op",
    "champion_op",
    "no_champions_op",
    "gate_op",
    "change_record_op",
    "monitor_op",
]

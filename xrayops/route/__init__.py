"""The DICOM routing node (`xrayops route`): results where radiologists look.

A modality or PACS C-STOREs a study to the node; the node groups the instances by study (a study is
complete after a quiet period without a new instance), sends each study to the endpoint asking for
Structured Reports (`sr: true`), and C-STOREs the SRs back to the PACS, into the same study.

Core logic, free of the network: `grouping` (studies from instances, bounded), `retry`
(exponential backoff, which errors are worth another try), `deadletter` (what keeps failing, kept
with its reason), `node` (the pipeline between them, with its metrics). The edges are thin:
`scp` (pynetdicom C-STORE SCP), `pacs` (C-STORE SCU), `health` (HTTP /healthz and /metrics); the
endpoint is any `Endpoint` (serving.client.EndpointClient: REST v2 or gRPC, bearer token).

PHI: instances and SRs are held in memory and, when they fail for good, in the dead-letter folder
(0700/0600). Logs, metrics, file and folder names carry pseudonyms (stu-/img-) and reason codes only.
"""
from xrayops.route.errors import EndpointError, RouteError, StoreError
from xrayops.route.items import EndpointAnswer, ReceivedInstance, Study

__all__ = ["EndpointAnswer", "EndpointError", "ReceivedInstance", "RouteError", "StoreError", "Study"]

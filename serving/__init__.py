"""KServe adapter: the predictor (`serving.model`), the DICOM transformer (`serving.transformer`),
the ensemble combiner (`serving.combiner`), the wire schema (`serving.schema`), the server
(`serving.server`, started by `xrayops serve`) with kserve's patches in one place
(`serving.kserve_compat`), a subprocess harness for tests and the demo (`serving.harness`) and the
client (`serving.client`)."""

"""Results in the hospital's own formats: DICOM Structured Reports of the endpoint's answers.

`xrayops.results.sr` turns a source image's header and its `InferenceResponse` into a TID 1500
Measurement Report (highdicom) filed into the source study; `xrayops.results.codes` holds the
coded concepts it uses; `xrayops.results.identity` says which model answered (TID 4019).
"""

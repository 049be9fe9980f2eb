"""Running task states on a base from their files: one loader (`loader.attach`, for an adapter's
`.safetensors` + `.json` and for a `.bnnpack` alike), one bank (`bank.Bank`: the base resident
once, task states swapped in by reference) and the numpy XNOR path (`xnor`). The file formats
themselves are `pipeline.nn.adapter_io` and `pipeline.nn.export`."""

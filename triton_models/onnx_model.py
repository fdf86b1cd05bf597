"""Triton python-backend model: runs an artifact's ONNX graph with onnxruntime (token ids in).

Runs inside tritonserver, as the model step of repositories made with ``--backend python`` (the
bundled tritonserver has no ONNX Runtime backend). It uses bgert.runtime's own OrtBackend, copied
next to this file by ``bgert triton-repo``. Requests that Triton's dynamic batcher hands over
together are concatenated per padded shape and run as one batch. A request that names the graph it
expects (parameter ``bgert_graph_sha256``, sent by bgert's TritonBackend) is refused when this model
runs another graph, so a client never gets another export's outputs after a repository change.
"""
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the vendored bgert.runtime wins

from bgert.runtime.backends import OrtBackend, resolve_providers, session_options  # noqa: E402
from bgert.triton_models.python_model import model_args  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        cfg = model_args(args, __file__)
        params = cfg.params
        if args.get("model_instance_kind") == "GPU":
            providers = [("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])})]
        else:
            providers = ["CPUExecutionProvider"]
        threads = int(params.get("intra_op_thread_count", "0")) or None
        self.backend = OrtBackend(os.path.join(cfg.here, params["graph_file"]), resolve_providers(providers),
                                  session_options(threads, 1))
        self.sha256 = params.get("bgert_graph_sha256", "")
        self.name, self.input_names, self.output_names = cfg.name, cfg.input_names, cfg.output_names

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}
        feeds = {}  # request index -> its inputs (a refused request has none)
        for i, request in enumerate(requests):
            expected = json.loads(request.parameters() or "{}").get("bgert_graph_sha256")
            if expected and self.sha256 and expected != self.sha256:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"model {self.name!r} does not run this artifact's graph (it serves sha256 {self.sha256[:12]}…, "
                    f"the request expects {expected[:12]}…): the repository changed; regenerate it from this "
                    "artifact, or open the artifact this repository was made from"))
                continue
            f = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.input_names}
            feeds[i] = f
            groups.setdefault(tuple(a.shape[1:] for a in f.values()), []).append(i)
        for members in groups.values():
            try:
                batch = {n: np.concatenate([feeds[i][n] for i in members]) for n in self.input_names}
                outs = self.backend.run(batch, self.output_names)
            except Exception as e:
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bgert onnx model: {e}"))
                continue
            start = 0
            for i in members:
                rows = len(feeds[i][self.input_names[0]])
                responses[i] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(n, np.ascontiguousarray(o[start:start + rows]))
                    for n, o in zip(self.output_names, outs)])
                start += rows
        return responses

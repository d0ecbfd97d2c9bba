"""tritonclient[grpc]==2.73.0 against a running `automm serve` (driven by tests/it/kserve.rs).

usage: kserve_tritonclient.py HOST:PORT IMAGE EXPECTED_PROBS(comma-separated)
Exits non-zero at the first check that fails; prints "tritonclient: all checks passed" at the end.
"""
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main():
    url, image, expected = sys.argv[1], sys.argv[2], np.array([float(x) for x in sys.argv[3].split(",")])
    c = grpcclient.InferenceServerClient(url=url)
    assert c.is_server_live() and c.is_server_ready(), "server not live/ready"
    assert c.is_model_ready("model"), "model not ready"
    md = c.get_model_metadata("model", as_json=True)
    assert md["versions"] == ["1"] and md["outputs"][1]["name"] == "probabilities", md
    cfg = c.get_model_config("model", as_json=True)["config"]
    assert int(cfg["max_batch_size"]) == 16 and cfg["input"][0]["dims"] == ["3", "33", "33"], cfg
    before = c.get_inference_statistics("model", as_json=True)["model_stats"][0]
    ok_before = int(before["inference_stats"]["success"].get("count", 0))

    data = np.array([open(image, "rb").read()], dtype=np.object_)
    inp = grpcclient.InferInput("images", [1], "BYTES")
    inp.set_data_from_numpy(data)
    outs = [grpcclient.InferRequestedOutput("probabilities"),
            grpcclient.InferRequestedOutput("logits", class_count=2)]
    r = c.infer("model", [inp], outputs=outs, request_id="tc-1", priority=1, timeout=10_000_000)
    probs = r.as_numpy("probabilities")
    assert probs.shape == (1, len(expected)), probs.shape
    diff = float(np.abs(probs[0] - expected).max())
    assert diff <= 1e-4, f"probabilities differ from automm's by {diff}"
    top = [x.decode() for x in r.as_numpy("logits").reshape(-1)]
    assert len(top) == 2 and top[0].split(":")[1] == str(int(np.argmax(expected))), top
    assert r.get_response().id == "tc-1"

    try:
        c.infer("no_such_model", [inp])
        raise AssertionError("an unknown model was answered")
    except InferenceServerException as e:
        assert "unknown model" in str(e), e
    after = c.get_inference_statistics("model", as_json=True)["model_stats"][0]
    ok_after = int(after["inference_stats"]["success"]["count"])
    assert ok_after == ok_before + 1, (ok_before, ok_after)
    print(f"tritonclient: max |probability difference| {diff:.2e}; top-2 {top}")
    print("tritonclient: all checks passed")


if __name__ == "__main__":
    main()

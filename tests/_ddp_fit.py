"""``python tests/_ddp_fit.py OUT_DIR``: the DDP fit of test_callbacks_ddp.py (2 CPU processes).

strategy="ddp" re-runs this script for rank 1 (Lightning's subprocess launcher), which pytest
cannot do for a test function; rank 0 is this process and writes ``main.pt``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from test_callbacks_models import BoringModule, LUTRecorder, trainer  # noqa: E402

from lightning_palettize.callbacks import PalettizationCallback  # noqa: E402

CONFIG = {
    "global_config": {"n_bits": 2, "weight_threshold": 0},
    "module_name_configs": {"net\\.2": {"n_bits": 3, "weight_threshold": 0, "milestone": 2}},
}

if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = BoringModule(n_batches=4)
    torch.save(model.state_dict(), os.path.join(out, "initial.pt"))
    callback = PalettizationCallback(CONFIG)
    ddp = trainer(
        strategy="ddp",
        devices=2,
        max_epochs=2,
        logger=CSVLogger(os.path.join(out, "logs"), name="ddp"),
        log_every_n_steps=1,
        callbacks=[callback, LUTRecorder(out)],
    )
    ddp.fit(model)
    if ddp.is_global_zero:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"state": state, "report": callback.report is not None}, f"{out}/main.pt")

"""A local plugin, enabled from custom_model.toml as "examples/lr_logger.py": prints each
model's learning rate at the end of every epoch."""

from izitorch import hookimpl


@hookimpl
def izitorch_epoch_finish(run, fold, epoch, scores):
    rates = ", ".join(f"{slot.name} lr={slot.optimizer.param_groups[0]['lr']:.2e}" for slot in fold.slots)
    print(f"  [lr_logger] epoch {epoch}: {rates}")

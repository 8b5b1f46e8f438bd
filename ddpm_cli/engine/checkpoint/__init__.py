"""The checkpoint file: ddpm's safetensors format, never pickle. `format` reads it without torch (header,
metadata, stored config: fast `ddpm inspect`); `tensors` writes and loads its weights and training state.
Importing this package imports no torch."""
from ddpm_cli.engine.checkpoint.format import (FORMAT, FORMAT_VERSION, MAX_HEADER, Header, StoredConfig, class_names,
                                               ema_decays, extra_ema_decays, has_ema_weights, read_checkpoint_config,
                                               read_header, require_ema_decay, stored_guide_step)
from ddpm_cli.engine.checkpoint.tensors import (Checkpoint, load_checkpoint, load_guide, load_into, load_model,
                                                load_optimizer_state, load_state, optimizer_state_dict, read_tensors,
                                                save_state, save_weights, weights_metadata, write_tensors)

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_HEADER", "Header", "StoredConfig", "class_names", "ema_decays",
           "extra_ema_decays", "has_ema_weights", "read_checkpoint_config", "read_header", "require_ema_decay",
           "stored_guide_step", "Checkpoint", "load_checkpoint", "load_guide", "load_into", "load_model",
           "load_optimizer_state", "load_state", "optimizer_state_dict", "read_tensors", "save_state", "save_weights",
           "weights_metadata", "write_tensors"]

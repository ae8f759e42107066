"""MAGNET: mask-alignment LoRA fine-tuning of the expert layer's I2T attention."""

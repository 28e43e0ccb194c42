"""Model families, one file each: `clip` (CLIP, SigLIP, ALIGN-style dual encoders)."""

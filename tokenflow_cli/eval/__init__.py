"""Evaluation: reconstruction (rFID/KID, PSNR, SSIM, LPIPS), codebook usage, teacher zero-shot,
GenEval-style generation and VQA. Each command's library side returns a JSON-able report."""

"""Generic evaluation machinery: FID/KID with torch-fidelity (and its Inception weights built
offline), per-image metrics (PSNR, SSIM, LPIPS), the built-in held-out image sets and PNG grids.
The capability-specific evaluations live with their capability (tokenizer/rfid.py,
generation/geneval.py, understanding/vqa.py, teacher/evaluate.py)."""

"""The testbed: a small world with ground truth, where merge quality can be measured (docs/testbed.md).

- `world`: procedural subjects and styles and a renderer `render(subject, style, pose)` that
  draws *any* subject in *any* style (32×32 RGB), all deterministic from a world seed;
- `textenc` / `base`: a small text-conditioned pixel-space diffusion UNet with SDXL's module
  names and two attention widths, pretrained on generic renders, and its DDIM sampler that
  applies a merge per denoising step;
- `build`: trains the base, the subject and style LoRAs (ordinary kohya files), the judges and
  the testbed hypernetwork, cached under the user cache;
- `judges` / `judge_server`: subject and style classifiers, also served behind an
  OpenAI-compatible vision endpoint so that `python -m hypernet judge` runs end to end;
- `bench`: content / style / joint accuracy of every merge method on the held-out pairs.

Nothing here imports ComfyUI. Nothing here says anything about SDXL image quality.
"""

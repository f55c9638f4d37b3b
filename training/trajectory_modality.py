"""``--modality trajectory`` for train_mmf.py: MMF on 1-D trajectories ``(B, C, L)`` with a stock `UNet1DModel`.

train_mmf.py keeps its one training loop (Accelerate, curriculum, EMA, checkpoints, exact resume, DDP-by-hand
gradient averaging); at the few points where images and trajectories differ it asks a `TrajectoryModality`:
the data set, the backbone, ``model_fn``, the noise (known entries frozen), the pipeline and the sample plots.

Data: ``--trajectory_system pendulum|spring`` simulates ``--trajectory_num_train`` ground-truth trajectories of
``--trajectory_length`` points from the training range of initial states (seeded by ``--seed``), or
``--trajectory_file X.npy`` reads user trajectories ``(N, C, L)`` (``--trajectory_file_layout NLC`` for
``(N, L, C)``). Per-channel mean/std of the training set normalise the data and are saved in the pipeline.
A fraction ``--trajectory_condition_prob`` of the rows is trained with its first state known (see
`mmf_diffusers.pipeline_mmf_trajectory`), so the saved pipeline samples both unconditionally and from a start state.
"""

from __future__ import annotations

import argparse
import os

MODALITIES = ("image", "trajectory")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("trajectory modality (--modality trajectory; the image data flags are then unused)")
    g.add_argument("--modality", choices=MODALITIES, default="image",
                   help="What to generate: images (UNet2DModel, MMFPipeline) or 1-D trajectories (UNet1DModel, "
                   "MMFTrajectoryPipeline).")
    g.add_argument("--trajectory_system", choices=("pendulum", "spring"), default="pendulum",
                   help="Simulated physical system (mmf_diffusers.trajectories.SYSTEMS): a damped pendulum "
                   "(theta, omega) or two coupled damped masses (x1, x2, v1, v2).")
    g.add_argument("--trajectory_file", type=str, default=None,
                   help="Train on trajectories from a .npy file instead of a simulated system.")
    g.add_argument("--trajectory_file_layout", choices=("NCL", "NLC"), default="NCL",
                   help="Layout of --trajectory_file: (N, C, L) or (N, L, C).")
    g.add_argument("--trajectory_length", type=int, default=64,
                   help="Time points per simulated trajectory; must be divisible by 2**(UNet levels - 1).")
    g.add_argument("--trajectory_num_train", type=int, default=4096, help="Simulated training trajectories.")
    g.add_argument("--trajectory_condition_prob", type=float, default=0.5,
                   help="Fraction of training rows whose first state is known (conditioning), in [0, 1].")
    g.add_argument("--second_time_channels", type=int, default=8,
                   help="Sinusoid channels carrying h = t - r into the UNet1DModel (extra_in_channels = 1 + this).")


def validate(args, need) -> None:
    need(args.trajectory_length >= 2, f"--trajectory_length must be >= 2, got {args.trajectory_length}")
    need(args.trajectory_num_train >= 1, f"--trajectory_num_train must be positive, got {args.trajectory_num_train}")
    need(0.0 <= args.trajectory_condition_prob <= 1.0,
         f"--trajectory_condition_prob must be in [0, 1], got {args.trajectory_condition_prob}")
    need(args.second_time_channels >= 2 and args.second_time_channels % 2 == 0,
         f"--second_time_channels must be a positive even number, got {args.second_time_channels}")
    need(args.trajectory_file is None or os.path.isfile(args.trajectory_file),
         f"--trajectory_file {args.trajectory_file!r} is not a file")
    need(args.pretrained_unet is None, "--pretrained_unet is for images; the trajectory modality builds a UNet1DModel")
    need(args.mixed_precision in (None, "no"), "--mixed_precision is not supported with --modality trajectory")
    bad = [c for c in args.block_out_channels if c <= 0 or c % 8]
    need(not bad, f"--block_out_channels {bad}: UNet1DModel's residual blocks need multiples of 8")
    need(len(args.block_out_channels) >= 2, "--block_out_channels needs at least two levels")
    if args.trajectory_file is None:
        factor = 2 ** (len(args.block_out_channels) - 1)
        need(args.trajectory_length % factor == 0,
             f"--trajectory_length {args.trajectory_length} must be divisible by 2**{len(args.block_out_channels) - 1}"
             f" = {factor} for {len(args.block_out_channels)} UNet levels")


class TrajectoryModality:
    """What train_mmf.py needs to train on trajectories; built after the seed is fixed."""

    def __init__(self, args, log=print):
        import torch

        from mmf_diffusers import trajectories as T

        self.args = args
        if args.trajectory_file is not None:
            data = T.load_trajectories_npy(args.trajectory_file, args.trajectory_file_layout)
            self.system = None
            self.name = os.path.basename(os.path.abspath(args.trajectory_file))
            factor = 2 ** (len(args.block_out_channels) - 1)
            if data.shape[-1] % factor:
                raise ValueError(f"{self.name}: length {data.shape[-1]} is not divisible by {factor} for "
                                 f"{len(args.block_out_channels)} UNet levels")
        else:
            self.system = T.get_system(args.trajectory_system)
            self.name = f"{self.system.name} (simulated, training range)"
            data = T.make_trajectories(self.system, args.trajectory_num_train, args.trajectory_length, "train",
                                       seed=args.seed)
        self.channels, self.length = data.shape[1], data.shape[2]
        self.mean, self.std = T.channel_stats(data)
        self.dataset = T.TrajectoryDataset(data, self.mean, self.std, args.trajectory_condition_prob, seed=args.seed)
        # Augmented samples: C state channels + the known mask.
        self.sample_shape = (self.channels + 1, self.length)
        self.ground_truth = data[: args.num_sample_images].to(torch.float32)
        log(f"{len(self.dataset)} trajectories ({self.name}), {self.channels} channels x {self.length} points; "
            f"mean {self.mean.tolist()}, std {self.std.tolist()}")

    def build_unet(self):
        from mmf_diffusers.unet1d import build_mmf_unet1d

        a = self.args
        return build_mmf_unet1d(self.channels, self.length, a.block_out_channels, a.layers_per_block,
                                a.second_time_channels)

    def model_fn(self, unet):
        from mmf_diffusers.unet1d import trajectory_model_fn

        return trajectory_model_fn(unet, self.args.time_scale, self.args.second_time_channels)

    @staticmethod
    def prepare_noise(x, noise):
        from mmf_diffusers.unet1d import freeze_known_entries

        return freeze_known_entries(x, noise)

    def make_pipeline(self, unet):
        from mmf_diffusers import MMFScheduler
        from mmf_diffusers.pipeline_mmf_trajectory import MMFTrajectoryPipeline

        s = self.system
        return MMFTrajectoryPipeline(
            unet=unet, scheduler=MMFScheduler(), time_scale=self.args.time_scale,
            second_time_channels=self.args.second_time_channels, channel_mean=self.mean.tolist(),
            channel_std=self.std.tolist(), channel_names=list(s.channel_names) if s else None,
            dt=s.dt if s else None, system=s.name if s else None)

    def save_samples(self, pipeline, path: str, steps: int, seed: int):
        """Plot ground truth (top) against samples: unconditional, and from the ground truth's start states."""
        import torch

        from mmf_diffusers.trajectories import plot_trajectories

        n = self.ground_truth.shape[0]
        unconditional = pipeline(num_samples=n, num_inference_steps=steps, output_type="pt",
                                 generator=torch.Generator().manual_seed(seed)).trajectories
        conditional = pipeline(start_state=self.ground_truth[:, :, 0], num_inference_steps=steps, output_type="pt",
                               generator=torch.Generator().manual_seed(seed)).trajectories
        rows = {"ground truth": self.ground_truth, f"MMF {steps} step": unconditional,
                f"MMF {steps} step, from the ground truth's start": conditional}
        plot_trajectories(rows, self.mean, self.std).save(path)
        return path

    def write_model_card(self, output_dir: str, info: dict, secrets=()) -> str:
        """``README.md`` for a trajectory pipeline folder (``info`` as train_mmf.py builds it), written by
        `mmf_diffusers.model_card.write_model_card` (trajectory tags and Hub task, loading snippets, the sample plot)
        with this run's data set and shape."""
        from mmf_diffusers.model_card import write_model_card

        s = self.system
        fields = ("repo_id", "command", "steps", "curriculum", "loss", "wall_time_s", "sample_grid")
        card = {key: info[key] for key in fields if info.get(key) is not None}
        card["dataset"] = self.name  # train_mmf.py's "dataset" is the image flags' (--dataset_name / the folder)
        card["description"] = (
            f"Trajectories {self.channels} x {self.length} "
            f"({', '.join(s.channel_names) + f', dt = {s.dt}' if s else 'channels x time'}) of {self.name}, generated "
            "in one network evaluation with Modular MeanFlow (You, Liu & He, arXiv 2508.17426) on a stock diffusers "
            "`UNet1DModel`, unconditionally or from a known start state (the returned trajectory starts exactly "
            "there). t = 0 is data, t = 1 noise; one step is x = z_1 - u(z_1, 0, 1)."
        )
        return write_model_card(output_dir, card, secrets=secrets)

"""Default config: every key the code reads, with its meaning. Experiment configs override only what differs.

Usage: python -m immiscible_jax.main --config=configs/default.py --workdir=DIR [--config.KEY=VALUE ...]
The defaults describe a small digits run on CPU; see configs/cifar10_ct.py and configs/cifar10_ict.py for the papers'.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  # Base seed: parameters, noise, data order. Per-step keys are fold_in(seed key, step).
  config.seed = 0

  config.data = data = ml_collections.ConfigDict()
  # 'digits' (scikit-learn's bundled 8x8 digits, no download), 'cifar10' (tfds), 'folder' (images in class folders).
  data.dataset = 'digits'
  # For 'folder': a directory of class sub-folders of PNG/JPEG, or a .tar.gz of one.
  data.path = ''
  # For 'cifar10': the TFDS data directory ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets).
  data.tfds_data_dir = ''
  # Split to train on ('train' / 'test').
  data.split = 'train'
  # Spatial size of the images fed to the model (digits: 8; CIFAR-10: 32). Folder images must already have it.
  data.image_size = 8
  # Number of channels (digits: 1; RGB: 3).
  data.channels = 1
  # Random horizontal flips (off for digits: mirrored digits are not digits).
  data.random_flip = False
  # grain worker processes (0 = read in the main process).
  data.num_workers = 0

  config.model = model = ml_collections.ConfigDict()
  # Architecture; only 'ncsnpp' so far.
  model.name = 'ncsnpp'
  # Base channel count.
  model.nf = 32
  # Channel multiplier per resolution level (one level per entry; each level after the first halves the size).
  model.ch_mult = (1, 2)
  # Residual blocks per level.
  model.num_res_blocks = 1
  # Resolutions (in pixels) at which self-attention is applied.
  model.attn_resolutions = (4,)
  # Dropout rate inside residual blocks.
  model.dropout = 0.0
  # Noise-level embedding of c_noise = 0.25 log(sigma): 'fourier' (Gaussian Fourier features) or 'positional'.
  model.embedding_type = 'positional'
  # Scale of the Fourier features (CM: 16; iCT: 0.02).
  model.fourier_scale = 16.0
  # Residual block type: 'biggan' (up/down-sampling inside the block) or 'ddpm'.
  model.resblock_type = 'biggan'
  # Divide residual and skip sums by sqrt(2).
  model.skip_rescale = True
  # Convolutional (vs. plain) up/down-sampling.
  model.resamp_with_conv = True
  # Scale of the last conv's initialisation in each block (0 = zero init, as in NCSN++).
  model.init_scale = 0.0
  # Multiplier on c_noise before the 'positional' embedding (CM's ImageNet code feeds 1000 * 0.25 log sigma).
  model.positional_scale = 1000.0
  # FIR (StyleGAN2) filtering in up/down-sampling instead of nearest / box resampling (NCSN++ CIFAR-10: True;
  # off by default: it made the digits step about 2x slower on CPU).
  model.fir = False
  # Separable FIR taps.
  model.fir_kernel = (1, 3, 3, 1)
  # Input pyramid summed into each down-sampled level: 'residual' (NCSN++ CIFAR-10) or 'none'.
  model.progressive_input = 'none'

  config.training = training = ml_collections.ConfigDict()
  # 'ct' (Song et al. 2023) or 'ict' (Song & Dhariwal 2023).
  training.recipe = 'ct'
  # Global batch size over all devices and hosts; must divide by the device count.
  training.batch_size = 64
  # Total optimisation steps (K in the papers' schedules).
  training.num_steps = 1000
  # Distance between online and target outputs: 'l2' (squared), 'l1', 'pseudo_huber'.
  training.loss = 'l2'
  # Pseudo-Huber c; a negative value means 0.00054 * sqrt(image dimension), as in iCT.
  training.huber_c = -1.0
  # Karras grid.
  training.sigma_min = 0.002
  training.sigma_max = 80.0
  training.rho = 7.0
  training.sigma_data = 0.5
  # Discretisation curriculum N(k): CT uses s0=2, s1=150; iCT uses s0=10, s1=1280.
  training.s0 = 2
  training.s1 = 150
  # CT target EMA: mu(k) = exp(s0 log(mu0) / N(k)). Ignored by iCT (target = stop_gradient(online)).
  training.mu0 = 0.9
  # iCT lognormal noise-level distribution.
  training.p_mean = -1.1
  training.p_std = 2.0
  # EMA decay of the parameters used for sampling and evaluation.
  training.ema_rate = 0.999
  # Print / log scalars every this many steps.
  training.log_every_steps = 50

  config.assignment = assignment = ml_collections.ConfigDict()
  # 'none' (vanilla), 'jv' (exact, in-graph, fastest on CPU), 'auction' (near-exact, in-graph, fewest loop
  # steps: for GPU/TPU), 'hungarian' (exact, ott-jax's, in-graph), 'sinkhorn' (entropic OT rounded to a
  # permutation), 'scipy' (paper's host solver via pure_callback), 'knn' (nearest of knn_k draws per image;
  # changes the noise marginal).
  assignment.method = 'none'
  # 'l2' (Euclidean, as in the paper) or 'sqeuclidean' (minibatch OT; only -x.n matters).
  assignment.cost = 'sqeuclidean'
  # Inputs quantised to this dtype before the distance computation (accumulation always float32).
  assignment.dtype = 'bfloat16'
  # 'local' (each device its own shard) or 'global' (solve over the whole global batch).
  assignment.scope = 'local'
  # Candidates per image for 'knn'.
  assignment.knn_k = 8
  # Sinkhorn: epsilon relative to the cost's standard deviation, iteration cap, convergence threshold.
  assignment.sinkhorn_epsilon = 0.05
  assignment.sinkhorn_max_iterations = 200
  assignment.sinkhorn_threshold = 1e-3
  # Sinkhorn rounding: row-reduction bids per row before the rows left take their cheapest free column.
  assignment.sinkhorn_arr_sweeps = 1
  # 'jv' warm start (speed only, always exact): Sinkhorn epsilon relative to the cost's std,
  assignment.jv_warm_start_epsilon = 0.03
  # 'jv' warm-start Sinkhorn iterations (0 = start from column minima),
  assignment.jv_warm_start_iterations = 40
  # 'jv' augmenting-row-reduction bids per row before its Dijkstra augmentations.
  assignment.jv_arr_sweeps = 1
  # 'auction' bid increment, relative to the cost's std (smaller: closer to optimal, more rounds needed).
  assignment.auction_epsilon = 0.01
  # 'auction' warm-start Sinkhorn epsilon, relative to the cost's std.
  assignment.auction_warm_start_epsilon = 0.1
  # 'auction' warm-start Sinkhorn iterations (0 = start from column minima); each is one loop step.
  assignment.auction_warm_start_iterations = 10
  # 'auction' cap on bidding rounds (loop steps); rows still unplaced then take free columns in parallel.
  assignment.auction_max_rounds = 80
  # 'auction' cap on rounds of parallel pairwise swaps after bidding (0 = none); each lowers the total cost.
  assignment.auction_swap_rounds = 4

  config.optim = optim = ml_collections.ConfigDict()
  # 'adam' or 'radam'.
  optim.optimizer = 'radam'
  optim.learning_rate = 4e-4
  # Linear warm-up steps (0 = none).
  optim.warmup_steps = 0
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  # Clip the global gradient norm to this (0 = off).
  optim.grad_clip = 1.0

  config.eval = eval_config = ml_collections.ConfigDict()
  # Evaluate every this many steps (0 = never during training).
  eval_config.every_steps = 0
  # One-step samples drawn per evaluation.
  eval_config.num_samples = 1000
  # 'pixels' (Frechet distance on raw pixels, weight-free) or 'inception' (FID; needs converted weights).
  eval_config.metric = 'pixels'
  # Average-pool pixels by this factor before the pixel metric (1 = none).
  eval_config.pixel_downsample = 1
  # Per-device batch size for sampling and feature extraction.
  eval_config.batch_size = 256
  # Real images for the reference statistics (from data.dataset, eval.reference_split).
  eval_config.reference_split = 'train'
  eval_config.reference_num_images = 50000

  config.sampling = sampling = ml_collections.ConfigDict()
  # Noise levels of the sampler: (sigma_max,) is one-step; CM Algorithm 1 for more. iCT CIFAR-10 2-step: (80, 0.821).
  sampling.sigmas = (80.0,)
  # Samples written by --mode=sample.
  sampling.num_samples = 64
  # Samples per .npz shard.
  sampling.shard_size = 10000
  sampling.seed = 1

  config.checkpoint = checkpoint = ml_collections.ConfigDict()
  # Save every this many steps (and at the end).
  checkpoint.every_steps = 500
  # Keep at most this many checkpoints.
  checkpoint.max_to_keep = 3
  return config

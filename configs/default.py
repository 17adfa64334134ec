"""Default config: every key the code reads, with its meaning. Experiment configs override only what differs.

Usage: python -m immiscible_jax.main --config=configs/default.py --workdir=DIR [--config.KEY=VALUE ...]
The defaults describe a small digits run on CPU; see configs/cifar10_ct.py and configs/cifar10_ict.py for the papers'.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  # Base seed (int) of the run: parameter init, noise, noise levels, dropout and data order. Per-step keys are
  # fold_in(key(seed), step).
  config.seed = 0

  config.data = data = ml_collections.ConfigDict()
  # Image source: 'digits' (scikit-learn's bundled 8x8 digits, no download), 'cifar10' (tfds, prepared
  # offline) or 'folder' (PNG/JPEG files under data.path).
  data.dataset = 'digits'
  # For 'folder': a folder of PNG/JPEG files (optionally in split/class sub-folders) or a .tar.gz / .tgz of
  # one; '' for the other datasets.
  data.path = ''
  # For 'cifar10': the TFDS data directory ('' = $TFDS_DATA_DIR, else ~/tensorflow_datasets).
  data.tfds_data_dir = ''
  # Split to train on: a split name such as 'train' or 'test' (digits: both give all 1797 images).
  data.split = 'train'
  # Side of the square images fed to the model, in pixels; must divide the stored size (digits 8, CIFAR-10 32,
  # a folder's own size): smaller sizes are area-averaged.
  data.image_size = 8
  # Channels of the images: 1 (grayscale; digits) or 3 (RGB; CIFAR-10).
  data.channels = 1
  # Random horizontal flips of training images, True / False (off for digits: mirrored digits are not digits).
  data.random_flip = False
  # grain worker processes reading training batches (int >= 0; 0 = read in the main process).
  data.num_workers = 0

  config.model = model = ml_collections.ConfigDict()
  # Architecture: 'ncsnpp' (the only one so far).
  model.name = 'ncsnpp'
  # Base channel count (int); every channel count it leads to must split into GroupNorm's min(C // 4, 32)
  # groups (a multiple of 32, or of 4 below 128).
  model.nf = 32
  # Channel multiplier (of nf) per resolution level, a tuple of positive ints: one level per entry; each level
  # after the first halves the image, so data.image_size must divide by 2^(levels - 1).
  model.ch_mult = (1, 2)
  # Residual blocks per level (int >= 1).
  model.num_res_blocks = 1
  # Resolutions, in pixels, at which the levels apply self-attention (a tuple; each must be a level's size;
  # () = attention only in the middle block).
  model.attn_resolutions = (4,)
  # Dropout rate inside the residual blocks, in [0, 1); the online and target branches share the mask.
  model.dropout = 0.0
  # Embedding of the noise level c_noise = 0.25 log(sigma): 'fourier' (Gaussian Fourier features) or
  # 'positional' (sinusoidal).
  model.embedding_type = 'positional'
  # Scale (std) of the Gaussian Fourier features' frequencies, > 0; used by 'fourier' only (CM: 16; iCT: 0.02).
  model.fourier_scale = 16.0
  # Residual block type: 'biggan' (up/down-sampling inside the block) or 'ddpm'.
  model.resblock_type = 'biggan'
  # Divide residual and skip sums by sqrt(2), True / False.
  model.skip_rescale = True
  # Up/down-sampling with a convolution (True) or without one (False).
  model.resamp_with_conv = True
  # Initialisation scale (>= 0) of the last conv of every block and of the output conv (0 = zeros, as in
  # NCSN++: the network outputs 0 at initialisation).
  model.init_scale = 0.0
  # Multiplier (> 0) on c_noise before the 'positional' embedding (CM's ImageNet code feeds 1000 * 0.25 log
  # sigma); unused by 'fourier'.
  model.positional_scale = 1000.0
  # FIR (StyleGAN2) filtering in up/down-sampling instead of nearest / box resampling, True / False (NCSN++
  # CIFAR-10: True; off by default: it made the digits step about 2x slower on CPU).
  model.fir = False
  # Taps of the separable FIR filter (a tuple of at least 2 numbers with a positive sum); used when fir=True.
  model.fir_kernel = (1, 3, 3, 1)
  # Input pyramid summed into each down-sampled level: 'residual' (NCSN++ CIFAR-10) or 'none'.
  model.progressive_input = 'none'
  # Compute dtype of the network body: 'float32' or 'bfloat16' (activations, convolutions and matmuls; parameters,
  # optimizer state, GroupNorm statistics, the noise embedding, the output head and the loss stay float32).
  model.dtype = 'float32'

  config.training = training = ml_collections.ConfigDict()
  # Training recipe: 'ct' (Song et al. 2023: EMA target, uniform noise levels) or 'ict' (Song & Dhariwal 2023:
  # target = stop_gradient(online), lognormal noise levels, doubling curriculum).
  training.recipe = 'ct'
  # Global batch size in images, over all devices and hosts; must divide by the device count.
  training.batch_size = 64
  # Total optimisation steps, K in the papers' schedules N(k) (int > 0).
  training.num_steps = 1000
  # Distance between online and target outputs: 'l2' (mean squared error), 'l1' (mean absolute error),
  # 'pseudo_huber' (sqrt(||x - y||^2 + c^2) - c, iCT) or 'lpips' (LPIPS-VGG16, CT's CIFAR-10 metric; weights
  # from `make weights`).
  training.loss = 'l2'
  # 'lpips': both outputs are resized bilinearly to this many pixels square before LPIPS (int; 224 as in CT's
  # code; 0 = the images' own size); VGG16's four poolings need at least 16.
  training.lpips_resolution = 224
  # Pseudo-Huber constant c (>= 0, in the units of ||x - y|| for images in [-1, 1]); a negative value means
  # 0.00054 * sqrt(H * W * C), as in iCT.
  training.huber_c = -1.0
  # Smallest noise level sigma_min of the Karras grid (> 0); f(x, sigma_min) = x.
  training.sigma_min = 0.002
  # Largest noise level sigma_max of the Karras grid (> sigma_min); one-step sampling starts from sigma_max z.
  training.sigma_max = 80.0
  # Karras grid exponent rho (> 0): sigma_i = (s_min^(1/rho) + i/(N-1) (s_max^(1/rho) - s_min^(1/rho)))^rho.
  training.rho = 7.0
  # Standard deviation of the data, sigma_data (> 0), in the scalings c_skip, c_out, c_in (images in [-1, 1]).
  training.sigma_data = 0.5
  # Curriculum N(k): initial number of discretisation steps s0 (int > 0; CT 2, iCT 10).
  training.s0 = 2
  # Curriculum N(k): final number of discretisation steps s1 (int >= s0; CT 150, iCT 1280).
  training.s1 = 150
  # CT target EMA: mu(k) = exp(s0 log(mu0) / N(k)), mu0 in (0, 1). Ignored by iCT (target = stop_gradient(online)).
  training.mu0 = 0.9
  # iCT noise levels: mean P_mean of log(sigma) under the lognormal the pair index is drawn from.
  training.p_mean = -1.1
  # iCT noise levels: standard deviation P_std (> 0) of log(sigma) under that lognormal.
  training.p_std = 2.0
  # EMA decay per step, in [0, 1), of the parameters used for sampling and evaluation.
  training.ema_rate = 0.999
  # Write the averaged training scalars every this many steps (int > 0; a multiple of steps_per_dispatch).
  training.log_every_steps = 50
  # Train steps per compiled call (int > 0; a lax.scan over that many batches): fewer host dispatches when they
  # show in the step time. num_steps and every interval (log, eval, checkpoint) must be multiples of it.
  training.steps_per_dispatch = 1
  # Gradient accumulation (int > 0): each step's batch is noised and assigned as a whole (the large-batch
  # coupling), then its gradients are averaged over this many micro-batches; batch_size must divide by
  # devices * grad_accum_steps.
  training.grad_accum_steps = 1

  config.assignment = assignment = ml_collections.ConfigDict()
  # 'none' (vanilla), 'jv' (exact, in-graph, fastest on CPU), 'auction' (near-exact, in-graph, fewest loop
  # steps: for GPU/TPU), 'hungarian' (exact, ott-jax's, in-graph), 'sinkhorn' (entropic OT rounded to a
  # permutation), 'scipy' (paper's host solver via pure_callback), 'knn' (nearest of knn_k draws per image;
  # changes the noise marginal).
  assignment.method = 'none'
  # 'l2' (Euclidean, as in the paper) or 'sqeuclidean' (minibatch OT; only -x.n matters). 'knn' is unaffected: an
  # image's nearest candidate is the same under either.
  assignment.cost = 'sqeuclidean'
  # Inputs quantised to this dtype before the distance computation: 'bfloat16' or 'float32' (accumulation
  # always float32).
  assignment.dtype = 'bfloat16'
  # 'local' (each device its own shard) or 'global' (solve over the whole global batch).
  assignment.scope = 'local'
  # Candidates per image for 'knn' (int >= 1).
  assignment.knn_k = 8
  # 'sinkhorn': entropic regularisation epsilon, relative to the cost's standard deviation (> 0).
  assignment.sinkhorn_epsilon = 0.05
  # 'sinkhorn': cap on Sinkhorn iterations (int >= 1).
  assignment.sinkhorn_max_iterations = 200
  # 'sinkhorn': convergence threshold on the marginals' error (> 0).
  assignment.sinkhorn_threshold = 1e-3
  # 'sinkhorn' rounding: row-reduction bids per row (int >= 0) before the rows left take their cheapest free
  # column.
  assignment.sinkhorn_arr_sweeps = 1
  # 'jv' warm start (speed only, always exact): Sinkhorn epsilon relative to the cost's std (> 0).
  assignment.jv_warm_start_epsilon = 0.03
  # 'jv' warm-start Sinkhorn iterations (int >= 0; 0 = start from column minima).
  assignment.jv_warm_start_iterations = 40
  # 'jv' augmenting-row-reduction bids per row (int >= 0) before its Dijkstra augmentations.
  assignment.jv_arr_sweeps = 1
  # 'auction' bid increment relative to the cost's std (> 0; smaller: closer to optimal, needs more rounds).
  assignment.auction_epsilon = 0.01
  # 'auction' warm-start Sinkhorn epsilon relative to the cost's std (> 0).
  assignment.auction_warm_start_epsilon = 0.1
  # 'auction' warm-start Sinkhorn iterations (int >= 0; 0 = start from column minima); each is one loop step.
  assignment.auction_warm_start_iterations = 10
  # 'auction' cap on bidding rounds (int >= 0; loop steps); rows still unplaced then take free noise in parallel.
  assignment.auction_max_rounds = 80
  # 'auction' cap on rounds of parallel pairwise swaps after bidding (int >= 0; 0 = none); each lowers the cost.
  assignment.auction_swap_rounds = 4

  config.optim = optim = ml_collections.ConfigDict()
  # Optimizer: 'adam' or 'radam' (optax; no weight decay).
  optim.optimizer = 'radam'
  # Peak learning rate (> 0), reached after the warm-up and then held constant.
  optim.learning_rate = 4e-4
  # Steps of linear learning-rate warm-up from 0 (int >= 0; 0 = none).
  optim.warmup_steps = 0
  # Adam / RAdam decay rate of the first-moment (gradient) average, beta1 in [0, 1).
  optim.b1 = 0.9
  # Adam / RAdam decay rate of the second-moment (squared gradient) average, beta2 in [0, 1).
  optim.b2 = 0.999
  # Adam / RAdam epsilon added to the denominator for numerical stability (> 0).
  optim.eps = 1e-8
  # Clip the global gradient norm to this before the optimizer (>= 0; 0 = off).
  optim.grad_clip = 1.0

  config.eval = eval_config = ml_collections.ConfigDict()
  # Evaluate during training every this many steps and after the last one (int >= 0; 0 = never; a multiple of
  # training.steps_per_dispatch).
  eval_config.every_steps = 0
  # Samples per evaluation (int >= 2): one-step samples from the EMA parameters during training; samples with
  # sampling.sigmas in --mode=eval.
  eval_config.num_samples = 1000
  # 'pixels' (Frechet distance on raw pixels, weight-free) or 'inception' (FID; needs converted weights).
  eval_config.metric = 'pixels'
  # Average-pool the pixels by this factor before the 'pixels' metric (int >= 1, dividing the image size;
  # 1 = none).
  eval_config.pixel_downsample = 1
  # Per-device batch size for sampling and feature extraction (int >= 1).
  eval_config.batch_size = 256
  # Split of data.dataset whose real images give the reference statistics (e.g. 'train').
  eval_config.reference_split = 'train'
  # Number of real images in the reference statistics (int >= 2; at most the split's size is used).
  eval_config.reference_num_images = 50000

  config.sampling = sampling = ml_collections.ConfigDict()
  # Noise levels of the sampler, a decreasing tuple within (sigma_min, sigma_max]: (sigma_max,) is one-step;
  # longer ones run CM Algorithm 1 (iCT CIFAR-10 2-step: (80, 0.821)).
  sampling.sigmas = (80.0,)
  # Samples written by --mode=sample (int > 0).
  sampling.num_samples = 64
  # Samples per .npz shard written by --mode=sample (int > 0).
  sampling.shard_size = 10000
  # Seed of the sampling noise (int): --mode=sample / eval draw sample j from fold_in(key(seed), j); the
  # evaluator during training uses one fixed stream derived from it.
  sampling.seed = 1

  config.parallel = parallel = ml_collections.ConfigDict()
  # How the step is mapped over the devices: 'pmap' (jax.pmap, stacked state copies) or 'shard_map' (jax.jit +
  # jax.shard_map over a one-axis Mesh, state replicated by sharding). Same per-device step and results.
  parallel.mode = 'pmap'

  config.profile = profile = ml_collections.ConfigDict()
  # First step of the jax.profiler trace of the training loop (int >= 0): tracing starts at the first dispatch
  # boundary at or after it (compilation and the first steps are best left out).
  profile.start_step = 10
  # Steps to trace from profile.start_step (int >= 0; 0 = no trace, the default). Process 0 writes the trace to
  # WORKDIR/profile (TensorBoard's profile plugin; perfetto_trace.json.gz for ui.perfetto.dev).
  profile.num_steps = 0

  config.checkpoint = checkpoint = ml_collections.ConfigDict()
  # Save a checkpoint every this many steps (int > 0; a multiple of training.steps_per_dispatch); also at the
  # end and on preemption.
  checkpoint.every_steps = 500
  # Keep at most this many checkpoints, the newest (int > 0).
  checkpoint.max_to_keep = 3
  return config

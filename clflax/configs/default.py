r"""The default clflax config: VOC segmentation -> COCO detection -> Imagenette classification, every field commented.

One ImageNet-pretrained EfficientNet-Lite0 backbone with three heads learns the three tasks in sequence with no
continual-learning strategy ('naive' fine-tuning). The repository's experiment files (configs/agem.py, ...) and
your own start from it: `config = default.get_config(arg); config.strategy.names = ('agem',)`. `arg='smoke'`
shrinks everything (tiny model, 64 px, a few steps; ~1 min on CPU) for checks and tests.
"""
import ml_collections

from clflax.strategies import registry


def get_config(arg=None):
  """Returns the default config; `arg='smoke'` shrinks everything for CI and tests."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # One seed drives init, data order, augmentation, memories and dropout.
  config.tasks = ('seg', 'det', 'cls')  # Stage order; each name is a head of MultiTaskNet.
  # Compile with most XLA optimisations off: tiny models compile several times faster (big models run slower).
  config.fast_compile = False
  # Root folder of the datasets; '' uses the small real sample shipped inside the package.
  config.data_dir = ''

  config.data = ml_collections.ConfigDict()
  config.data.voc_seg = 'mini_voc_seg'  # VOC folder under data_dir (flat mini layout or VOCdevkit/VOC2012).
  config.data.coco_det = 'mini_coco_det'  # COCO folder under data_dir (mini labels.json or official layout).
  config.data.imagenette = 'imagenette_160'  # Folder-per-class set under data_dir.
  config.data.mnist = 'mnist'  # Folder with the four MNIST idx(.gz) files (classic protocols).
  config.data.cache_dir = ''  # Prepared TFDS files; '' = ~/tensorflow_datasets/clflax.
  config.data.skip_bad = False  # True: skip (and count) corrupt images/annotations instead of failing.
  config.data.max_boxes = 32  # Boxes per image kept for detection (padded with a valid flag).
  config.data.augment = True  # Random resized crop + horizontal flip during training.
  config.data.read_threads = 4  # Background threads decoding training batches ahead of the step (0: inline).
  config.data.prefetch = 8  # Training batches kept ready ahead of the step.

  config.model = ml_collections.ConfigDict()
  config.model.backbone = 'lite0'  # EfficientNet variant: b0..b7, lite0..lite4, or 'tiny' (tests).
  # ImageNet weights for the backbone: 'default' (Lite0 file of the pip package), a .pth path, or '' (random init).
  config.model.pretrained = 'default'
  config.model.image_size = 224  # Square input resolution in pixels.
  config.model.neck_channels = 64  # Width of the FPN neck(s).
  # One FPN neck for seg and det (True), or one each: det's stage then cannot rewrite the features the seg head reads
  # (naive, shared neck: seg 43.1 -> 4.2 mIoU during the det stage).
  config.model.shared_neck = False
  config.model.depthwise = 'auto'  # Depthwise conv: 'shifted' (fast on CPU), 'xla' (GPU/TPU), 'auto' per backend.
  config.model.dropout = 0.2  # Dropout before the classification layer.
  # Classification head init: 'imagenet' = the pretrained ImageNet classifier's rows of the classes (they must be
  # ImageNet WordNet ids, as Imagenette's are), 'random', or 'auto' (imagenet when the classes allow it).
  config.model.cls_head_init = 'auto'
  # Backbone batch norm on its (pretrained) running statistics in training too: batches of 8 neither overwrite the
  # ImageNet statistics nor one task's images the statistics earlier tasks rely on (seg alone: 30.7 mIoU vs 8.7).
  config.model.frozen_bn = True
  config.model.max_detections = 100  # Boxes decoded per image for detection mAP.
  # Computation dtype: 'float32', or 'bfloat16' (mixed precision, for GPU / TPU): convolutions and matmuls in it;
  # parameters, optimizer state, batch-norm statistics, losses and every strategy's arithmetic stay float32.
  config.model.dtype = 'float32'
  # The det head's image-level multi-label branch (which classes an image holds): the image-level mAP's scores.
  config.model.det_image_head = True
  config.model.hidden = (256, 256)  # Hidden widths of the MLP (backbone='mlp', classic benchmarks only).
  config.model.init = 'default'  # MLP init: 'default' or 'agem_paper' (classic benchmarks only).

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 8  # Global batch (split over all devices).
  config.train.eval_batch_size = 16  # Global eval batch.
  # Epochs per stage, in config.tasks order.
  # (seg alone at 224 px: 30.7 mIoU after 12 epochs, 43.1 after 20; det's image-level mAP peaks around epoch 12.)
  config.train.epochs = ml_collections.ConfigDict(dict(seg=20, det=12, cls=6))
  config.train.steps_per_epoch = 0  # 0 = one pass over the training set; >0 caps it (smoke runs).
  config.train.optimizer = 'adamw'  # Base optimizer: 'adamw', 'adam' or 'sgd'.
  config.train.momentum = 0.9  # SGD momentum (0 = plain SGD).
  config.train.constant_learning_rate = False  # True: no warm-up or cosine restarts (the classic protocols).
  config.train.learning_rate = 1e-3  # Peak learning rate of each stage.
  config.train.backbone_lr_scale = 0.1  # Backbone learning rate = this x learning_rate (< 1 keeps pretrained features).
  config.train.weight_decay = 1e-4  # Decoupled weight decay (adamw) / L2 (sgd).
  config.train.warmup_steps = 50  # Linear warm-up at the start of every stage.
  config.train.restart_epochs = 4  # Cosine annealing with warm restarts every this many epochs (SGDR).
  config.train.clip_norm = 1.0  # Global gradient-norm clipping; 0 disables it.
  # Clip + base optimizer on the raveled parameters: compiles ~2x faster for many-leaf nets (a copy per step).
  config.train.flatten_optimizer = True
  config.train.label_smoothing = 0.1  # Label smoothing of the classification cross-entropy.
  config.train.dice_weight = 1.0  # Segmentation loss = CE + dice_weight * dice.
  config.train.size_weight = 0.1  # CenterNet box-size L1 weight.
  config.train.offset_weight = 1.0  # CenterNet centre-offset L1 weight.
  config.train.image_label_weight = 1.0  # Weight of the det head's image-level multi-label loss.
  # Multiplier of each task's loss (also applies to its memory loss in replay/A-GEM).
  config.train.loss_weights = ml_collections.ConfigDict(dict(seg=1.0, det=1.0, cls=1.0))
  config.train.early_stopping_patience = 4  # Epochs without validation improvement before a stage stops.
  # Multi-task upper bound (configs/joint.py): every step also trains every other task on a batch of its whole
  # (un-augmented) training set, so each stage trains all heads. Not continual; vision stages only.
  config.train.joint = False
  config.train.balance_finetune_steps = 0  # >0: after the last stage, this many steps on all tasks' memories at once.
  # Memory kept per task for that fine-tune when no strategy keeps a larger one.
  config.train.balance_memory_per_task = 64
  config.train.checkpoint_every_steps = 200  # In-stage checkpoint period (stage snapshots are always kept).
  config.train.log_every_steps = 20  # Console/TensorBoard logging period.

  config.strategy = registry.default_config()  # Continual-learning strategies; see clflax/strategies/registry.py.

  # Multi-host: jax.distributed.initialize() before anything touches devices. On TPU pods / SLURM the arguments are
  # discovered from the environment; elsewhere set them (or JAX_COORDINATOR_ADDRESS etc.).
  config.distributed = ml_collections.ConfigDict()
  config.distributed.enabled = False  # Call jax.distributed.initialize (needed only with several processes).
  config.distributed.coordinator_address = ''  # 'host:port' of process 0; '' = auto-detect.
  config.distributed.num_processes = 0  # 0 = auto-detect.
  config.distributed.process_id = -1  # -1 = auto-detect.

  config.tracking = ml_collections.ConfigDict()
  config.tracking.mlflow = False  # Also log params, scalars, stage metrics and artifacts to MLflow (optional dep).
  config.tracking.mlflow_uri = ''  # MLflow tracking URI; '' = file:<workdir>/mlruns.
  config.tracking.experiment = 'clflax'  # MLflow experiment name.

  config.eval = ml_collections.ConfigDict()
  config.eval.criterion_tolerance = 5.0  # Seed criterion: final score >= own-stage baseline - this many points.
  config.eval.max_examples = 0  # 0 = the whole validation split; >0 caps it (smoke runs).

  if arg == 'smoke':
    apply_smoke(config)
  elif arg:
    raise ValueError(f"unknown config arg {arg!r}; expected '' or 'smoke'")
  return config


def apply_smoke(config):
  """Tiny model, 64 px, a few steps per stage: a full pipeline run in about a minute on CPU."""
  config.fast_compile = True
  config.model.backbone = 'tiny'
  config.model.pretrained = ''
  config.model.image_size = 64
  config.model.neck_channels = 16
  config.model.max_detections = 20
  config.model.frozen_bn = False  # A random backbone has no statistics worth keeping ...
  config.train.backbone_lr_scale = 1.0  # ... and everything to learn.
  config.train.batch_size = 4
  config.train.eval_batch_size = 8
  config.train.epochs = ml_collections.ConfigDict(dict(seg=2, det=2, cls=2))
  config.train.steps_per_epoch = 3
  config.train.warmup_steps = 1
  config.train.restart_epochs = 1
  config.train.checkpoint_every_steps = 4
  config.train.log_every_steps = 2
  config.eval.max_examples = 8
  for name in ('agem', 'replay'):
    config.strategy[name].memory_per_task = 8
  config.strategy.agem.ref_batch = 4
  config.strategy.replay.batch = 4
  config.strategy.ewc.fisher_samples = 4
  config.strategy.mas.samples = 4
  return config

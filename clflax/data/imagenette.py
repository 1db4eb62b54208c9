"""Folder-per-class image classification (Imagenette and alike) as a TFDS builder.

Layout: `{train,val}/<class folder>/*.{JPEG,jpg,jpeg,png}`. Classes are the sorted train folder
names; WordNet-id folders get readable names where known (Imagenette and Imagewoof ids), other
folders keep their own name. `tfds.folder_dataset.ImageFolder` needs TensorFlow and has no data
source, hence this small builder.
"""
import pathlib

import tensorflow_datasets as tfds

from clflax.data import builder_util

WNID_NAMES = {
    # Imagenette.
    'n01440764': 'tench', 'n02102040': 'English springer', 'n02979186': 'cassette player',
    'n03000684': 'chain saw', 'n03028079': 'church', 'n03394916': 'French horn',
    'n03417042': 'garbage truck', 'n03425413': 'gas pump', 'n03445777': 'golf ball',
    'n03888257': 'parachute',
    # Imagewoof.
    'n02086240': 'Shih-Tzu', 'n02087394': 'Rhodesian ridgeback', 'n02088364': 'beagle',
    'n02089973': 'English foxhound', 'n02093754': 'Border terrier', 'n02096294': 'Australian terrier',
    'n02099601': 'golden retriever', 'n02105641': 'Old English sheepdog', 'n02111889': 'Samoyed',
    'n02115641': 'dingo',
}
SPLITS = ('train', 'val')
IMAGE_SUFFIXES = ('.jpeg', '.jpg', '.png')


def class_folders(source: pathlib.Path) -> list[str]:
  return sorted(p.name for p in (source / 'train').iterdir() if p.is_dir())


def class_names(folders: list[str]) -> list[str]:
  """Readable names for known WordNet ids; other folders keep their own name."""
  return [WNID_NAMES.get(f, f) for f in folders]


def list_images(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


class FolderClasses(builder_util.SourceFolderBuilder, skip_registration=True):
  """Image classification from one folder per class (labels = sorted train folder names)."""

  name = 'clflax_folder_classes'
  VERSION = tfds.core.Version('1.0.0')
  LAYOUT = '{train,val}/<class folder>/*.JPEG (one folder per class, same folders in both splits)'

  @classmethod
  def check_layout(cls, source_dir):
    for split in SPLITS:
      if not (source_dir / split).is_dir():
        raise cls.layout_error(source_dir, f'{split}/ missing')
    folders = class_folders(source_dir)
    if not folders:
      raise cls.layout_error(source_dir, 'no class folders under train/')
    extra = sorted(set(p.name for p in (source_dir / 'val').iterdir() if p.is_dir()) - set(folders))
    if extra:
      raise cls.layout_error(source_dir, f'val classes {extra[:3]} not in train/')
    names = class_names(folders)
    if len(set(names)) != len(names):
      raise cls.layout_error(source_dir, 'two class folders map to the same name')

  def _info(self):
    folders = class_folders(self._source_dir)
    metadata = self._metadata()
    metadata['folders'] = folders
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=class_names(folders)),
            'file_name': tfds.features.Text(),
        }),
        metadata=metadata,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    folders = self.info.metadata['folders']
    items = [(label, path) for label, folder in enumerate(folders)
             if (self._source_dir / split / folder).is_dir()
             for path in list_images(self._source_dir / split / folder)]
    self.count_candidates(split, 'files', len(items))
    for label, path in items:
      try:
        image, _ = builder_util.read_image(path)
      except builder_util.BadInputError as err:
        self.bad_input(split, 'files', err)
        continue
      name = f'{path.parent.name}/{path.name}'
      yield name, {'image': image, 'label': label, 'file_name': name}


def load(source_dir, *, cache_dir=None, skip_bad=False):
  """Prepares (once) and returns {'train', 'val'} data sources of a folder-per-class set."""
  return builder_util.prepare(FolderClasses, source_dir, cache_dir=cache_dir,
                              skip_bad=skip_bad).as_data_source()

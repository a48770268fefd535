"""Classification pretraining of the backbones (``detkit pretrain``, ``detkit eval-cls``): datasets
(``datasets``), augmentation and test crops (``transforms``), the training stream (``loading``), the
backbone as a classifier (``model``), the trainer (``trainer``) and the metrics (``evaluate``)."""

"""Face data without TensorFlow: formats, builders, degradation, alignment, pipeline."""
# formats and image preparation
from kdface.data._images import (
    UndecodableImageError,
    decode_image,
    encode_image,
    read_image_file,
)
from kdface.data._recordio import (
    IRHeader,
    RecordIO,
    RecordIOError,
    RecordIOExamples,
    build_recordio_index,
    write_recordio,
)
from kdface.data._verification_bin import (
    UnsafePickleError,
    read_verification_bin,
    read_verification_bin_encoded,
    write_verification_bin,
)
from kdface.data._pairs import LfwPairs, read_lfw_pairs, write_lfw_pairs
from kdface.data._folders import IdentityFolders, read_identity_folders
from kdface.data._align import (
    TEMPLATE_112,
    align_face,
    face_template,
    read_landmarks_csv,
    similarity_transform,
)
from kdface.data._degrade import (
    LR_SIZES,
    LR_SUBSETS,
    LowResolutionAugment,
    default_blur_sigma,
    degrade_to_low_resolution,
    low_resolution_shape,
    lr_probe,
    lr_probe_pairs,
)
# synthetic identities, tfds builders and the two-view pipeline
from kdface.data._degrade_device import DecideOnlyAugment, DeviceLowResolution
from kdface.data._synthetic import (
    IdentityParams,
    identity_params,
    make_synthetic_dataset,
    render_identity_images,
    render_identity_sample,
    render_identity_sample_with_landmarks,
    sample_identity_params,
    sample_rng,
)
from kdface.data._tfds_builders import (
    TRAINING_BUILDER,
    VERIFICATION_BUILDER,
    build_training_dataset,
    build_verification_dataset,
    built_dataset_names,
    dataset_path,
    kfold_fold_ids,
    load_dataset_metadata,
    load_training_source,
    load_verification_source,
    source_fingerprint,
    write_landmarks_csv,
)
from kdface.data._balanced import BATCH_SAMPLERS, record_labels
from kdface.data._heldout import (HELDOUT_FRACTION, HeldOutSplit, TrainingView, heldout_split,
                                  record_key, split_training_source)
from kdface.data._pipeline import (
    VIEWS,
    TwoViewPipeline,
    device_put_batch,
    make_training_pipeline,
    make_verification_arrays,
    normalize_images,
)
# face detection for real photos
from kdface.data._detect import (
    YUNET_MODEL_FILE,
    DetectedFaces,
    FaceDetector,
    NoFaceError,
    default_yunet_model,
    detect_and_align,
    largest_face,
)

__all__ = ["BATCH_SAMPLERS", "LR_SUBSETS", "record_labels", "RecordIOExamples",
           "HELDOUT_FRACTION", "HeldOutSplit", "TrainingView", "heldout_split", "record_key",
           "split_training_source",
           "align_face", "build_recordio_index", "DecideOnlyAugment", "DeviceLowResolution",
           "build_training_dataset",
           "build_verification_dataset", "built_dataset_names", "dataset_path", "decode_image",
           "default_blur_sigma", "degrade_to_low_resolution", "device_put_batch", "encode_image",
           "face_template", "identity_params", "IdentityFolders", "IdentityParams", "IRHeader",
           "kfold_fold_ids", "LfwPairs", "load_dataset_metadata", "load_training_source",
           "load_verification_source", "low_resolution_shape", "LowResolutionAugment", "lr_probe",
           "lr_probe_pairs", "LR_SIZES", "make_synthetic_dataset", "make_training_pipeline",
           "make_verification_arrays", "normalize_images", "read_identity_folders",
           "read_image_file", "read_landmarks_csv", "read_lfw_pairs", "read_verification_bin",
           "read_verification_bin_encoded", "RecordIO", "RecordIOError", "render_identity_images",
           "render_identity_sample", "render_identity_sample_with_landmarks",
           "sample_identity_params", "sample_rng", "similarity_transform", "source_fingerprint",
           "TEMPLATE_112", "TRAINING_BUILDER", "TwoViewPipeline", "UndecodableImageError",
           "UnsafePickleError", "VERIFICATION_BUILDER", "VIEWS", "write_landmarks_csv",
           "write_lfw_pairs", "write_recordio", "write_verification_bin",
           "YUNET_MODEL_FILE", "DetectedFaces", "FaceDetector", "NoFaceError",
           "default_yunet_model", "detect_and_align", "largest_face"]

from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_FLOAT32: _ClassVar[ImageFormat]
    IMAGE_FORMAT_UINT8: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]

class InterpolationMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INTERPOLATION_METHOD_UNSPECIFIED: _ClassVar[InterpolationMethod]
    INTERPOLATION_METHOD_LINEAR: _ClassVar[InterpolationMethod]
    INTERPOLATION_METHOD_SPHERICAL: _ClassVar[InterpolationMethod]

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_UNLOADING: _ClassVar[ModelState]
    MODEL_STATE_UNAVAILABLE: _ClassVar[ModelState]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_UINT8: DType
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_FLOAT32: ImageFormat
IMAGE_FORMAT_UINT8: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
INTERPOLATION_METHOD_UNSPECIFIED: InterpolationMethod
INTERPOLATION_METHOD_LINEAR: InterpolationMethod
INTERPOLATION_METHOD_SPHERICAL: InterpolationMethod
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_UNLOADING: ModelState
MODEL_STATE_UNAVAILABLE: ModelState

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Images(_message.Message):
    __slots__ = ("tensor", "png", "format")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    png: _containers.RepeatedScalarFieldContainer[bytes]
    format: ImageFormat
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., png: _Optional[_Iterable[bytes]] = ..., format: _Optional[_Union[ImageFormat, str]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model_name", "model_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "latent_dim", "image_shape", "likelihood", "execution_provider", "max_batch_rows", "max_batch_delay_ms", "max_request_rows", "max_queue_rows", "dataset", "metrics", "mixtures", "preprocessing", "classes", "family", "latent_groups", "conditional", "class_prior", "editable")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LATENT_DIM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_ROWS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    MIXTURES_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    LATENT_GROUPS_FIELD_NUMBER: _ClassVar[int]
    CONDITIONAL_FIELD_NUMBER: _ClassVar[int]
    CLASS_PRIOR_FIELD_NUMBER: _ClassVar[int]
    EDITABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    latent_dim: int
    image_shape: _containers.RepeatedScalarFieldContainer[int]
    likelihood: str
    execution_provider: str
    max_batch_rows: int
    max_batch_delay_ms: float
    max_request_rows: int
    max_queue_rows: int
    dataset: str
    metrics: _containers.ScalarMap[str, float]
    mixtures: int
    preprocessing: Preprocessing
    classes: _containers.RepeatedScalarFieldContainer[str]
    family: str
    latent_groups: _containers.RepeatedCompositeFieldContainer[LatentGroup]
    conditional: bool
    class_prior: _containers.RepeatedScalarFieldContainer[float]
    editable: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., latent_dim: _Optional[int] = ..., image_shape: _Optional[_Iterable[int]] = ..., likelihood: _Optional[str] = ..., execution_provider: _Optional[str] = ..., max_batch_rows: _Optional[int] = ..., max_batch_delay_ms: _Optional[float] = ..., max_request_rows: _Optional[int] = ..., max_queue_rows: _Optional[int] = ..., dataset: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., mixtures: _Optional[int] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., classes: _Optional[_Iterable[str]] = ..., family: _Optional[str] = ..., latent_groups: _Optional[_Iterable[_Union[LatentGroup, _Mapping]]] = ..., conditional: bool = ..., class_prior: _Optional[_Iterable[float]] = ..., editable: bool = ...) -> None: ...

class LatentGroup(_message.Message):
    __slots__ = ("shape", "offset")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ...) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("channels", "size", "fit", "background")
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    FIT_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    channels: int
    size: _containers.RepeatedScalarFieldContainer[int]
    fit: str
    background: str
    def __init__(self, channels: _Optional[int] = ..., size: _Optional[_Iterable[int]] = ..., fit: _Optional[str] = ..., background: _Optional[str] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("num_samples", "seed", "temperature", "format", "chunk_rows", "temperatures", "classes", "model_name", "model_version")
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ROWS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    num_samples: int
    seed: int
    temperature: float
    format: ImageFormat
    chunk_rows: int
    temperatures: _containers.RepeatedScalarFieldContainer[float]
    classes: _containers.RepeatedScalarFieldContainer[str]
    model_name: str
    model_version: int
    def __init__(self, num_samples: _Optional[int] = ..., seed: _Optional[int] = ..., temperature: _Optional[float] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., chunk_rows: _Optional[int] = ..., temperatures: _Optional[_Iterable[float]] = ..., classes: _Optional[_Iterable[str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("images", "seed", "offset", "classes", "model_name", "model_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: Images
    seed: int
    offset: int
    classes: _containers.RepeatedScalarFieldContainer[str]
    model_name: str
    model_version: int
    def __init__(self, images: _Optional[_Union[Images, _Mapping]] = ..., seed: _Optional[int] = ..., offset: _Optional[int] = ..., classes: _Optional[_Iterable[str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("images", "sample", "seed", "image_files", "classes", "model_name", "model_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FILES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: Tensor
    sample: bool
    seed: int
    image_files: _containers.RepeatedScalarFieldContainer[bytes]
    classes: _containers.RepeatedScalarFieldContainer[str]
    model_name: str
    model_version: int
    def __init__(self, images: _Optional[_Union[Tensor, _Mapping]] = ..., sample: bool = ..., seed: _Optional[int] = ..., image_files: _Optional[_Iterable[bytes]] = ..., classes: _Optional[_Iterable[str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("mu", "sigma", "z", "seed", "classes", "model_name", "model_version")
    MU_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    mu: Tensor
    sigma: Tensor
    z: Tensor
    seed: int
    classes: _containers.RepeatedScalarFieldContainer[str]
    model_name: str
    model_version: int
    def __init__(self, mu: _Optional[_Union[Tensor, _Mapping]] = ..., sigma: _Optional[_Union[Tensor, _Mapping]] = ..., z: _Optional[_Union[Tensor, _Mapping]] = ..., seed: _Optional[int] = ..., classes: _Optional[_Iterable[str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("latents", "format", "classes", "model_name", "model_version")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    latents: Tensor
    format: ImageFormat
    classes: _containers.RepeatedScalarFieldContainer[str]
    model_name: str
    model_version: int
    def __init__(self, latents: _Optional[_Union[Tensor, _Mapping]] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., classes: _Optional[_Iterable[str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class ReconstructRequest(_message.Message):
    __slots__ = ("images", "format", "image_files", "classes", "model_name", "model_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FILES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: Tensor
    format: ImageFormat
    image_files: _containers.RepeatedScalarFieldContainer[bytes]
    classes: _containers.RepeatedScalarFieldContainer[str]
    model_name: str
    model_version: int
    def __init__(self, images: _Optional[_Union[Tensor, _Mapping]] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., image_files: _Optional[_Iterable[bytes]] = ..., classes: _Optional[_Iterable[str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class ImagesResponse(_message.Message):
    __slots__ = ("images", "classes", "model_name", "model_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: Images
    classes: _containers.RepeatedScalarFieldContainer[str]
    model_name: str
    model_version: int
    def __init__(self, images: _Optional[_Union[Images, _Mapping]] = ..., classes: _Optional[_Iterable[str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class InterpolateRequest(_message.Message):
    __slots__ = ("start_image", "start_latent", "start_file", "end_image", "end_latent", "end_file", "steps", "method", "format", "classes", "model_name", "model_version")
    START_IMAGE_FIELD_NUMBER: _ClassVar[int]
    START_LATENT_FIELD_NUMBER: _ClassVar[int]
    START_FILE_FIELD_NUMBER: _ClassVar[int]
    END_IMAGE_FIELD_NUMBER: _ClassVar[int]
    END_LATENT_FIELD_NUMBER: _ClassVar[int]
    END_FILE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    start_image: Tensor
    start_latent: Tensor
    start_file: bytes
    end_image: Tensor
    end_latent: Tensor
    end_file: bytes
    steps: int
    method: InterpolationMethod
    format: ImageFormat
    classes: _containers.RepeatedScalarFieldContainer[str]
    model_name: str
    model_version: int
    def __init__(self, start_image: _Optional[_Union[Tensor, _Mapping]] = ..., start_latent: _Optional[_Union[Tensor, _Mapping]] = ..., start_file: _Optional[bytes] = ..., end_image: _Optional[_Union[Tensor, _Mapping]] = ..., end_latent: _Optional[_Union[Tensor, _Mapping]] = ..., end_file: _Optional[bytes] = ..., steps: _Optional[int] = ..., method: _Optional[_Union[InterpolationMethod, str]] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., classes: _Optional[_Iterable[str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class InterpolateResponse(_message.Message):
    __slots__ = ("images", "latents", "classes", "model_name", "model_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: Images
    latents: Tensor
    classes: _containers.RepeatedScalarFieldContainer[str]
    model_name: str
    model_version: int
    def __init__(self, images: _Optional[_Union[Images, _Mapping]] = ..., latents: _Optional[_Union[Tensor, _Mapping]] = ..., classes: _Optional[_Iterable[str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("images", "importance_samples", "seed", "image_files", "classes", "model_name", "model_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FILES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: Tensor
    importance_samples: int
    seed: int
    image_files: _containers.RepeatedScalarFieldContainer[bytes]
    classes: _containers.RepeatedScalarFieldContainer[str]
    model_name: str
    model_version: int
    def __init__(self, images: _Optional[_Union[Tensor, _Mapping]] = ..., importance_samples: _Optional[int] = ..., seed: _Optional[int] = ..., image_files: _Optional[_Iterable[bytes]] = ..., classes: _Optional[_Iterable[str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class ImageScore(_message.Message):
    __slots__ = ("elbo", "reconstruction", "kl", "log_likelihood", "bits_per_dim", "class_name", "marginal")
    ELBO_FIELD_NUMBER: _ClassVar[int]
    RECONSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    LOG_LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_DIM_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    MARGINAL_FIELD_NUMBER: _ClassVar[int]
    elbo: float
    reconstruction: float
    kl: float
    log_likelihood: float
    bits_per_dim: float
    class_name: str
    marginal: bool
    def __init__(self, elbo: _Optional[float] = ..., reconstruction: _Optional[float] = ..., kl: _Optional[float] = ..., log_likelihood: _Optional[float] = ..., bits_per_dim: _Optional[float] = ..., class_name: _Optional[str] = ..., marginal: bool = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "importance_samples", "seed", "model_name", "model_version")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[ImageScore]
    importance_samples: int
    seed: int
    model_name: str
    model_version: int
    def __init__(self, scores: _Optional[_Iterable[_Union[ImageScore, _Mapping]]] = ..., importance_samples: _Optional[int] = ..., seed: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("images", "importance_samples", "seed", "image_files", "model_name", "model_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FILES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: Tensor
    importance_samples: int
    seed: int
    image_files: _containers.RepeatedScalarFieldContainer[bytes]
    model_name: str
    model_version: int
    def __init__(self, images: _Optional[_Union[Tensor, _Mapping]] = ..., importance_samples: _Optional[int] = ..., seed: _Optional[int] = ..., image_files: _Optional[_Iterable[bytes]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class ImageClasses(_message.Message):
    __slots__ = ("probabilities", "class_log_likelihoods", "log_likelihood", "class_name")
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    CLASS_LOG_LIKELIHOODS_FIELD_NUMBER: _ClassVar[int]
    LOG_LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    class_log_likelihoods: _containers.RepeatedScalarFieldContainer[float]
    log_likelihood: float
    class_name: str
    def __init__(self, probabilities: _Optional[_Iterable[float]] = ..., class_log_likelihoods: _Optional[_Iterable[float]] = ..., log_likelihood: _Optional[float] = ..., class_name: _Optional[str] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("results", "classes", "importance_samples", "seed", "model_name", "model_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ImageClasses]
    classes: _containers.RepeatedScalarFieldContainer[str]
    importance_samples: int
    seed: int
    model_name: str
    model_version: int
    def __init__(self, results: _Optional[_Iterable[_Union[ImageClasses, _Mapping]]] = ..., classes: _Optional[_Iterable[str]] = ..., importance_samples: _Optional[int] = ..., seed: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class EditRequest(_message.Message):
    __slots__ = ("images", "image_files", "source_classes", "target_class", "strength", "format", "model_name", "model_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FILES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_CLASSES_FIELD_NUMBER: _ClassVar[int]
    TARGET_CLASS_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: Tensor
    image_files: _containers.RepeatedScalarFieldContainer[bytes]
    source_classes: _containers.RepeatedScalarFieldContainer[str]
    target_class: str
    strength: float
    format: ImageFormat
    model_name: str
    model_version: int
    def __init__(self, images: _Optional[_Union[Tensor, _Mapping]] = ..., image_files: _Optional[_Iterable[bytes]] = ..., source_classes: _Optional[_Iterable[str]] = ..., target_class: _Optional[str] = ..., strength: _Optional[float] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class EditResponse(_message.Message):
    __slots__ = ("images", "source_classes", "target_class", "strength", "model_name", "model_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_CLASSES_FIELD_NUMBER: _ClassVar[int]
    TARGET_CLASS_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: Images
    source_classes: _containers.RepeatedScalarFieldContainer[str]
    target_class: str
    strength: float
    model_name: str
    model_version: int
    def __init__(self, images: _Optional[_Union[Images, _Mapping]] = ..., source_classes: _Optional[_Iterable[str]] = ..., target_class: _Optional[str] = ..., strength: _Optional[float] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "version", "state", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    state: ModelState
    reason: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[ModelState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model_name", "model_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model_name", "model_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

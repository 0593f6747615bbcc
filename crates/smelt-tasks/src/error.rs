//! Errors of the task layer: any lower layer's error, or a problem with the user's request.

pub type Result<T> = std::result::Result<T, TaskError>;

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Model(#[from] smelt_models::ModelError),
    #[error(transparent)]
    Data(#[from] smelt_data::DataError),
    #[error(transparent)]
    Train(#[from] smelt_train::TrainError),
    #[error("{0}")]
    Invalid(String),
}

impl From<TaskError> for smelt_train::TrainError {
    fn from(e: TaskError) -> Self {
        match e {
            TaskError::Train(t) => t,
            TaskError::Model(m) => smelt_train::TrainError::Model(m),
            other => smelt_train::TrainError::Task(other.to_string()),
        }
    }
}

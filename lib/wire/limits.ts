/**
 * The largest gRPC message either side of the scheduler's API accepts or sends, set on the server,
 * the executors' channel and the client alike: a job result carries its whole output tensor.
 */
export const GRPC_MESSAGE_LIMIT = 256 * 1024 * 1024;

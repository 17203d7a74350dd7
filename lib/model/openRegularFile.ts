import { constants, promises as fs, type Stats } from "node:fs";
import { ModelFormatError } from "./safetensors";

/**
 * Opens a model file for reading, refusing anything but a regular file. The open is
 * non-blocking, so a FIFO or a device node returns at once (a plain open of a FIFO waits for a
 * writer and would hold one of libuv's few threads, stalling every other file operation), and
 * the type is checked on the opened descriptor (fstat), not on the path, so the file checked is
 * the file read. Returns the open handle and that fstat.
 */
export async function openRegularFile(path: string): Promise<{ fh: fs.FileHandle; info: Stats }> {
  const fh = await fs.open(path, constants.O_RDONLY | constants.O_NONBLOCK);
  try {
    const info = await fh.stat();
    if (!info.isFile()) throw new ModelFormatError(`${path}: not a regular file`);
    return { fh, info };
  } catch (error) {
    await fh.close();
    throw error;
  }
}

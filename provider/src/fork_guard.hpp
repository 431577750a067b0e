// fork() while another thread holds a provider lock: the child inherits the lock held by a
// thread that does not exist there, and its first handshake would block for ever (Python's
// multiprocessing, a server forking workers while serving). Objects with such a lock
// register here; pthread_atfork handlers (installed once) take every registered lock
// before fork() and release it after, in the parent and in the child, where each object may
// also reset what a phantom thread could have left (a condition variable's waiters).
#pragma once

namespace qkd::prov {

class ForkGuarded {
 public:
  ForkGuarded(const ForkGuarded&) = delete;
  ForkGuarded& operator=(const ForkGuarded&) = delete;

  // Called by the handlers, in the forking thread.
  virtual void lock_for_fork() = 0;
  virtual void unlock_in_parent() = 0;
  virtual void unlock_in_child() = 0;

 protected:
  ForkGuarded() = default;
  ~ForkGuarded() = default;
  // The derived class calls these at the end of its constructor and at the start of its
  // destructor, so that the handlers never see it half made.
  void guard_forks();
  void unguard_forks();
};

}  // namespace qkd::prov

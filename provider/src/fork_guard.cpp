#include "fork_guard.hpp"

#include <pthread.h>

#include <algorithm>
#include <mutex>
#include <vector>

namespace qkd::prov {
namespace {

struct Registry {
  std::mutex mu;
  std::vector<ForkGuarded*> objects;
};

Registry& registry() {
  static auto* r = new Registry;  // never destroyed: handlers may run during exit
  return *r;
}

void prepare() {
  Registry& r = registry();
  r.mu.lock();  // held across fork(): no object comes or goes meanwhile
  for (ForkGuarded* o : r.objects) {
    o->lock_for_fork();
  }
}

void parent() {
  Registry& r = registry();
  for (auto it = r.objects.rbegin(); it != r.objects.rend(); ++it) {
    (*it)->unlock_in_parent();
  }
  r.mu.unlock();
}

void child() {
  Registry& r = registry();
  for (auto it = r.objects.rbegin(); it != r.objects.rend(); ++it) {
    (*it)->unlock_in_child();
  }
  r.mu.unlock();
}

}  // namespace

void ForkGuarded::guard_forks() {
  static std::once_flag installed;
  std::call_once(installed, [] { (void)pthread_atfork(&prepare, &parent, &child); });
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  r.objects.push_back(this);
}

void ForkGuarded::unguard_forks() {
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  std::erase(r.objects, this);
}

}  // namespace qkd::prov
